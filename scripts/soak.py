"""Soak: rounds of mixed requests through a running gateway, and the memory of each server process
after every round, to see that nothing grows without bound.

    .venv/bin/python scripts/soak.py --url http://127.0.0.1:8080 --api-key K --rounds 20 --per-round 600

Each request is one of: a short generation, a stream, two sampled choices with logprobs, a
stop sequence, an OpenAI-style completion, or (one in ten) a stream whose client hangs up after
its first bytes. 24 clients at once. With ``--apis all`` (a gateway with a response store,
``TRIDENT_RESPONSES_STORE``) a third of them are of the later APIs instead: a chat completion
stream, a stored response continued by ``previous_response_id``, a background response polled
to its end, a streamed background response whose client drops after a few events and resumes
after the last it read (its events checked: numbered on, once each, ended), and an Anthropic
Messages stream. After each round it prints the resident memory (RSS) of the
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


def _post(host: str, port: int, key: str, path: str, body: dict) -> dict:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        conn.request("POST", path, json.dumps(body), {"Authorization": f"Bearer {key}",
                                                      "Content-Type": "application/json"})
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path} {response.status}: {data[:200]!r}")
        return json.loads(data) if data.startswith(b"{") else {"raw": data}
    finally:
        conn.close()


def _events(data: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in data.split(b"\n") if line.startswith(b"data: {")]


def _resumed(host: str, port: int, key: str, model: str) -> str:
    """A streamed background response: read until a few events came, hang up, resume after the last."""
    body = json.dumps({"model": model, "input": "Count to twenty.", "max_output_tokens": 24, "background": True,
                       "stream": True}).encode()
    data = b""
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + key.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        want = random.randint(1, 6)
        while len(_events(data.split(b"\r\n\r\n", 1)[-1].rsplit(b"\n\n", 1)[0])) < want:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1.1 200"):
        return "refused " + data[:12].decode(errors="replace")
    seen = _events(data.split(b"\r\n\r\n", 1)[1].rsplit(b"\n\n", 1)[0])
    response_id, last = seen[0]["response"]["id"], seen[-1]["sequence_number"]
    conn = http.client.HTTPConnection(host, port, timeout=120)
    try:
        conn.request("GET", f"/v1/responses/{response_id}?stream=true&starting_after={last}",
                     headers={"Authorization": f"Bearer {key}"})
        rest = _events(conn.getresponse().read())
    finally:
        conn.close()
    numbers = [e["sequence_number"] for e in seen + rest]
    if numbers != list(range(len(numbers))) or rest[-1]["type"] not in ("response.completed", "response.incomplete"):
        return f"resume broken: {numbers[:3]}..{numbers[-3:]} {rest[-1]['type'] if rest else None}"
    return "resumed"


def later_api(host: str, port: int, key: str, model: str) -> str:
    """One request of the later APIs (``--apis all``)."""
    r = random.random()
    if r < 0.2:
        data = _post(host, port, key, "/v1/chat/completions", {"model": model, "max_tokens": 16, "stream": True,
                                                               "messages": [{"role": "user", "content": "Hi"}]})
        return "200" if data["raw"].endswith(b"data: [DONE]\n\n") else "chat stream unended"
    if r < 0.4:
        first = _post(host, port, key, "/v1/responses", {"model": model, "input": "Name a fruit.",
                                                         "max_output_tokens": 8})
        _post(host, port, key, "/v1/responses", {"model": model, "input": "Another.", "max_output_tokens": 8,
                                                 "previous_response_id": first["id"]})
        return "200"
    if r < 0.6:
        created = _post(host, port, key, "/v1/responses", {"model": model, "input": "Hi", "max_output_tokens": 12,
                                                           "background": True})
        for _ in range(600):
            conn = http.client.HTTPConnection(host, port, timeout=60)
            try:
                conn.request("GET", f"/v1/responses/{created['id']}", headers={"Authorization": f"Bearer {key}"})
                status = json.loads(conn.getresponse().read())["status"]
            finally:
                conn.close()
            if status not in ("queued", "in_progress"):
                return "200" if status in ("completed", "incomplete") else f"background {status}"
            time.sleep(0.1)
        return "background never ended"
    if r < 0.8:
        return _resumed(host, port, key, model)
    data = _post(host, port, key, "/v1/messages", {"model": model, "max_tokens": 16, "stream": True,
                                                   "messages": [{"role": "user", "content": "Hi"}]})
    return "200" if b"event: message_stop" in data["raw"] else "messages stream unended"


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
    p.add_argument("--apis", choices=["generate", "all"], default="generate",
                   help="all: a third of the requests of the later APIs (needs a response store)")
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
                    if args.apis == "all" and random.random() < 1 / 3:
                        outcome = later_api(host, port, args.api_key, args.model)
                    else:
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
