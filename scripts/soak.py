"""Soak: rounds of mixed requests through a running gateway, and the memory of each server process
after every round, to see that nothing grows without bound.

    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8080 --api-key K --rounds 20 --per-round 600

Each request is one of: a short generation, a stream, two sampled choices with logprobs, a
stop sequence, an OpenAI-style completion, or (one in ten) a stream whose client hangs up after
its first bytes. 24 clients at once. After each round it prints the resident memory (RSS) of the
Triton server, the ``llm`` and engine stubs and the gateway (master and workers) found on this machine (by
their command lines). Not a test: a person reads the numbers (docs/operations.md, Soak).
"""
from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import threading
import time
import http.client
from urllib.parse import urlsplit

BODIES = [
    {"prompt": "Hi", "max_new_tokens": 8},
    {"prompt": "Count: 1, 2,", "max_new_tokens": 16, "stream": True},
    {"prompt": "Tell me a story", "max_new_tokens": 12, "n": 2, "logprobs": 2, "temperature": 0.8},
    {"prompt": "List fruits", "max_new_tokens": 16, "stop_sequences": ["\n"]},
]
PROCESSES = (("triton", "tritonserver .*--model-repository"), ("llm", "triton_python_backend_stub .*/llm/1/model.py"),
             ("engine", "triton_python_backend_stub .*/tensorrt_llm/1/model.py"),
             ("gateway", "gunicorn.*gateway"))


def one(host: str, port: int, key: str, model: str) -> str:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    r = random.random()
    if r < 0.1:  # a client that hangs up mid-stream
        body = json.dumps({"prompt": "Count: 1, 2,", "max_new_tokens": 200, "stream": True}).encode()
        with socket.create_connection((host, port), timeout=60) as s:
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            s.recv(300)
            time.sleep(0.05)
        return "hung up"
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        if r < 0.25:
            conn.request("POST", "/v1/completions", json.dumps({"model": model, "prompt": "Say hi", "max_tokens": 8}),
                         headers)
        else:
            conn.request("POST", "/generate", json.dumps(random.choice(BODIES)), headers)
        response = conn.getresponse()
        response.read()
        return str(response.status)
    finally:
        conn.close()


def rss_mb(pattern: str) -> int:
    """Resident memory of the processes whose command line matches, summed (MB)."""
    total = 0
    for pid in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split():
        try:
            with open(f"/proc/{pid}/status") as f:
                total += int(f.read().split("VmRSS:")[1].split()[0])
        except (OSError, IndexError):
            continue  # gone meanwhile
    return total // 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--api-key", required=True)
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--per-round", type=int, default=600)
    p.add_argument("--clients", type=int, default=24)
    args = p.parse_args()
    split = urlsplit(args.url)
    host, port = split.hostname or "127.0.0.1", split.port or 80
    tally: dict[str, int] = {}
    for n in range(1, args.rounds + 1):
        started, lock, left = time.monotonic(), threading.Lock(), [args.per_round]

        def work() -> None:
            while True:
                with lock:
                    if left[0] <= 0:
                        return
                    left[0] -= 1
                try:
                    outcome = one(host, port, args.api_key, args.model)
                except Exception as exc:  # counted, not raised: the soak goes on
                    outcome = type(exc).__name__
                with lock:
                    tally[outcome] = tally.get(outcome, 0) + 1

        threads = [threading.Thread(target=work) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        memory = " ".join(f"{name}={rss_mb(pattern)}" for name, pattern in PROCESSES)
        print(f"round {n}: {args.per_round} requests in {time.monotonic() - started:.1f} s; RSS MB {memory}", flush=True)
    print("outcomes:", dict(sorted(tally.items())))


if __name__ == "__main__":
    main()
