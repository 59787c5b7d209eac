"""Load clients of the relay benchmarks (scripts/bench_gateway.py, scripts/bench_llm.py), each
run as its own process.

    python scripts/bench/clients.py grpc --url localhost:8001 --streams 200 --tokens 300
    python scripts/bench/clients.py sse --url http://127.0.0.1:8080 --key K --streams 200 --tokens 300
    python scripts/bench/clients.py engine --url localhost:8001 --streams 256 --tokens 300
    python scripts/bench/clients.py llm --url localhost:8001 --streams 256 --tokens 300

``grpc`` is the floor: a plain Python gRPC client (grpc.aio, one thread) consuming the streams
straight from Triton's ``llm`` model, with gRPC's client I/O set up as the gateway's
(gateway.grpc_env). ``sse`` opens the same streams through the gateway with a
bare asyncio HTTP/1.1 client (as cheap as a client can be, so that it leaves the CPU to the
gateway). ``engine`` and ``llm`` are bench_llm's: the same grpc.aio client on the engine
interface (``tensorrt_llm``, token ids) and on a real ``llm`` model in front of it. Each prints one
JSON object: tokens received, the process's own CPU seconds, and
time-to-first-token and inter-token-gap quantiles in milliseconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gateway  # noqa: E402,F401  (first: the floor reads gRPC as the gateway does, gateway.grpc_env)
import grpc  # noqa: E402  (imported before the clock starts: only streaming is measured)
import numpy as np  # noqa: E402
from tritonclient.grpc import service_pb2_grpc  # noqa: E402

from gateway.triton_codec import FINAL_FLAG, build_infer_request  # noqa: E402
from trident.engine_tensors import ENGINE_OUTPUTS  # noqa: E402
from trident.triton_wire import infer_request  # noqa: E402


def quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]  # noqa: E731
    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": v[-1]}


class Recorder:
    def __init__(self) -> None:
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.tokens = 0
        self.responses = 0  # those that carried text
        self.errors = 0

    def stream(self):
        start = time.perf_counter()
        last = None

        def token(count: int = 1) -> None:
            """A response holding ``count`` tokens arrived."""
            nonlocal last
            now = time.perf_counter()
            if last is None:
                self.ttft.append((now - start) * 1000)
            else:
                self.gaps.append((now - last) * 1000)
            last = now
            self.tokens += count
            self.responses += 1

        return token


async def grpc_streams(url: str, streams: int, tokens: int, rec: Recorder) -> None:
    inputs = {"text_input": np.array([[b"bench"]], dtype=object), "max_tokens": np.array([[tokens]], np.int32),
              "stream": np.array([[True]])}
    request = build_infer_request("llm", inputs)
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one() -> None:
            token = rec.stream()
            try:
                async for response in stub.ModelStreamInfer(iter((request,))):
                    infer = response.infer_response
                    if (infer.outputs and infer.outputs[0].name == "text_output"
                            and len(raw := infer.raw_output_contents[0]) > 4):
                        # The echo model's tokens, " 7": the spaces of the text after the 4-byte
                        # length (whose bytes may be 0x20 too: 32 bytes of text).
                        token(raw.count(b" ", 4))
                    if infer.parameters[FINAL_FLAG].bool_param:
                        break
            except grpc.aio.AioRpcError:
                rec.errors += 1

        await asyncio.gather(*(one() for _ in range(streams)))


ENGINE_PROMPT_IDS = list(range(100, 112))  # any ids: the echo engine (scripts/bench/echo_engine) repeats them


async def engine_streams(url: str, streams: int, tokens: int, rec: Recorder, *, model: str) -> None:
    """Streams of the engine interface (``tensorrt_llm``: token ids in and out, one token a
    response) with ``model`` "tensorrt_llm", or of the ``llm`` interface (text) with "llm", whose
    responses are counted by their ``completion_tokens`` at the end (a text response may hold
    more than one token). ``llm`` requests are the gateway's: with its admission response and a
    cancel token each (llm polls a request with a token for its client 5 times less often)."""
    if model == "llm":
        inputs = {"text_input": np.array([[b"1, 2, 3, 4, 5, 6,"]], dtype=object),
                  "max_tokens": np.array([[tokens]], np.int32), "stream": np.array([[True]])}
        requests = [build_infer_request("llm", inputs, admission=True, cancel_token=secrets.token_hex(12))
                    for _ in range(streams)]
    else:
        ids = ENGINE_PROMPT_IDS
        inputs = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
                  "request_output_len": np.array([[tokens]], np.int32), "streaming": np.array([[True]])}
        requests = [infer_request(model, inputs, outputs=ENGINE_OUTPUTS)] * streams  # as llm asks the engine
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

        async def one(request) -> None:
            token = rec.stream()
            counted = 0
            try:
                async for response in stub.ModelStreamInfer(iter((request,))):
                    if response.error_message:
                        rec.errors += 1
                        break
                    infer = response.infer_response
                    for out, raw in zip(infer.outputs, infer.raw_output_contents):
                        if out.name == "output_ids" and raw:
                            token(len(raw) // 4)
                        elif out.name == "text_output" and len(raw) > 4:
                            token(1)
                            counted += 1
                        elif out.name == "completion_tokens" and raw:
                            rec.tokens += int.from_bytes(raw[:4], "little", signed=True) - counted
                    if infer.parameters[FINAL_FLAG].bool_param:
                        break
            except grpc.aio.AioRpcError:
                rec.errors += 1

        await asyncio.gather(*(one(request) for request in requests))


async def sse_streams(url: str, key: str, streams: int, tokens: int, rec: Recorder) -> None:
    from urllib.parse import urlparse

    u = urlparse(url)
    body = json.dumps({"prompt": "bench", "max_new_tokens": tokens, "stream": True}).encode()
    head = (f"POST /generate HTTP/1.1\r\nHost: {u.hostname}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()

    async def one() -> None:
        token = rec.stream()
        try:
            reader, writer = await asyncio.open_connection(u.hostname, u.port, limit=1 << 20)
        except OSError:
            rec.errors += 1
            return
        writer.write(head + body)
        buf = b""
        ok = False
        while True:
            data = await reader.read(65536)
            if not data:
                break
            buf += data
            # Chunked framing is ignored: SSE events are found by their text, which never
            # spans a chunk boundary in a way that hides "event: token\n" (it is one line).
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                if b"event: token" in block:
                    data = block.split(b"data: ", 1)[1]
                    token(json.loads(data)["text"].count(" "))  # the echo model's tokens: " 7"
                elif b"event: done" in block:
                    ok = True
                elif b"event: error" in block:
                    rec.errors += 1
            if ok:
                break
        writer.close()
        if not ok and rec.errors == 0:
            rec.errors += 1

    await asyncio.gather(*(one() for _ in range(streams)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kind", choices=["grpc", "sse", "engine", "llm"])
    p.add_argument("--url", required=True)
    p.add_argument("--key", default="")
    p.add_argument("--streams", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    args = p.parse_args()
    rec = Recorder()
    cpu0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if args.kind == "grpc":
        asyncio.run(grpc_streams(args.url, args.streams, args.tokens, rec))
    elif args.kind in ("engine", "llm"):
        model = "llm" if args.kind == "llm" else "tensorrt_llm"
        asyncio.run(engine_streams(args.url, args.streams, args.tokens, rec, model=model))
    else:
        asyncio.run(sse_streams(args.url, args.key, args.streams, args.tokens, rec))
    cpu1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"tokens": rec.tokens, "responses": rec.responses, "errors": rec.errors, "cpu_s": cpu,
                      "wall_s": wall, "ttft_ms": quantiles(rec.ttft), "gap_ms": quantiles(rec.gaps)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
