"""The systems the benchmark drives, each behind ``request(prompt, n) -> Result``: trident
through the real Triton server, llama-cpp-python's server, llama.cpp's llama-server, and Hugging
Face generate() in this process."""
from __future__ import annotations

import dataclasses
import json
import queue
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from .llamacpp import ROOT, ensure_bench_venv, ensure_llama_server, gguf_path
from trident.child_process import free_port


@dataclasses.dataclass
class Result:
    t_start: float
    t_first: float
    t_end: float
    tokens: int
    text: str = ""  # the generated text (what a chat client sends back with its next turn)


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
            t_first, last_tokens, pieces = None, 0, []
            while True:
                t, result, error = events.get(timeout=900)
                if error is not None:
                    raise RuntimeError(f"{self.name}: {error}")
                text = result.as_numpy("text_output")
                if text is not None and text.size and text.reshape(-1)[0]:
                    t_first = t_first or t
                    pieces.append(text.reshape(-1)[0].decode())
                if result.get_response().parameters["triton_final_response"].bool_param:
                    tokens = result.as_numpy("completion_tokens")
                    if tokens is None:  # an empty final response after the last data
                        tokens = np.array([last_tokens])
                    return Result(t_start, t_first or t, t, int(tokens.reshape(-1)[0]), "".join(pieces))
                ct = result.as_numpy("completion_tokens")
                last_tokens = int(ct.reshape(-1)[0]) if ct is not None else 0
        finally:
            client.stop_stream()
            client.close()

    def stop(self) -> None:
        self.server.stop()


class TridentGateway(System):
    """The real gateway (gunicorn + gevent, one worker) in front of a TridentTriton: POST
    /generate streamed, greedy, exactly ``n`` tokens (``min_tokens`` = ``max_new_tokens``: the end
    token is banned, as end_id -1 does on the direct path)."""

    KEY = "bench-key"

    def __init__(self, name: str, triton: TridentTriton, *, work: Path, model_dir: Path) -> None:
        from trident.gateway_process import GatewayProcess

        self.name = name
        self.gateway = GatewayProcess(port=free_port(), triton_grpc_url=triton.url, workers=1,
                                      log_path=work / f"gateway-{name}.log",
                                      extra_env={"TRIDENT_API_KEY": self.KEY, "TRIDENT_TOKENIZER_DIR": str(model_dir)})
        self.gateway.start(timeout=120)
        self.pid = triton.pid  # memory: the Triton's (the gateway's is small and not the point)

    def request(self, prompt: str, n: int) -> Result:
        body = json.dumps({"prompt": prompt, "max_new_tokens": n, "min_tokens": n, "temperature": 0,
                           "stream": True}).encode()
        req = urllib.request.Request(self.gateway.url + "/generate", data=body,
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {self.KEY}"})
        t_start = time.perf_counter()
        t_first, pieces, tokens, event = None, [], 0, None
        with urllib.request.urlopen(req, timeout=900) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "token" and data["text"]:
                        t_first = t_first or time.perf_counter()
                        pieces.append(data["text"])
                    elif event == "done":
                        tokens = data["usage"]["completion_tokens"]
                    elif event == "error":
                        raise RuntimeError(f"{self.name}: {data}")
        t_end = time.perf_counter()
        return Result(t_start, t_first or t_end, t_end, tokens, "".join(pieces))

    def stop(self) -> None:
        self.gateway.stop()


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

    def __init__(self, *, work: Path, threads: int, slots: int, tokens: int, context: int = 256) -> None:
        port = free_port()
        ctx = slots * (context + tokens)  # llama-server splits the context between its slots
        self.log = open(work / "llama-server.log", "wb")
        self.proc = subprocess.Popen(
            [str(ensure_llama_server()), "-m", str(gguf_path()), "--host", "127.0.0.1", "--port", str(port),
             "-c", str(ctx), "-np", str(slots), "-t", str(threads), "-tb", str(threads), "-cb"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.base = f"http://127.0.0.1:{port}"
        wait_http(self.base + "/health", self.proc)

    cache_prompt = False  # its prefix reuse (a slot keeps its last prompt): on for the chat scenario

    def request(self, prompt: str, n: int) -> Result:
        body = {"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0.0, "stream": True,
                "cache_prompt": self.cache_prompt}
        t_start = time.perf_counter()
        t_first, tokens, t, pieces = None, 0, t_start, []
        for t, chunk in sse_lines(self.base + "/completion", body):
            if chunk.get("content"):
                t_first = t_first or t
                pieces.append(chunk["content"])
            if chunk.get("stop"):
                tokens = int(chunk.get("tokens_predicted") or chunk.get("timings", {}).get("predicted_n", 0))
        return Result(t_start, t_first or t, t, tokens, "".join(pieces))

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
