"""The TensorRT-LLM GPU path: engine build steps, the trtllm repository flavour, MPI launch.

Everything here is importable without a GPU, torch or tensorrt_llm: the build steps are plain
argv lists and JSON edits, run by ``build/build_engine.py`` and checked by CPU unit tests.

The version pair is pinned (docs/gpu.md says why and where each number comes from):
TensorRT-LLM 1.2.1 and the NGC image that ships it with Triton's C++ ``tensorrtllm`` backend.
Later TensorRT-LLM development removed the engine-building path (``convert_checkpoint.py``,
``trtllm-build``) and the C++ Triton backend, so moving past 1.2.x means another design.
"""

TRTLLM_VERSION = "1.2.1"
# First Triton release whose trtllm-python-py3 image ships TensorRT-LLM 1.2.1 (26.05 keeps it).
TRITON_RELEASE = "26.04"
TRITON_IMAGE = f"nvcr.io/nvidia/tritonserver:{TRITON_RELEASE}-trtllm-python-py3"
# Git refs of NVIDIA/TensorRT-LLM whose examples/ match the installed wheel (the converter script),
# tried in order: the release ref that tensorrtllm_backend tracks (PR #853), then the tag, which
# may not exist. Only used when the image has no copy of its own (converter.py).
TRTLLM_GIT_REFS = (f"release/{TRTLLM_VERSION}", f"v{TRTLLM_VERSION}")
