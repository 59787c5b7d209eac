#!/usr/bin/env python3
"""Churn of short streams straight to the ``llm`` model, to check that its Python-backend stub
survives (docs/architecture.md, "Objects the Python-backend stub frees").

Starts Triton on a repository, then CLIENTS threads each open 3-token streams to ``llm`` over
gRPC one after another for SECONDS; every other stream asks for ``text_output`` only. Prints the
streams completed, the errors, and any heap-corruption or abort line of Triton's log (its work
folder, Triton's log in it, is removed after a clean run and kept after a failed one). Before the
adapters kept clear of Triton 2.51's stub freeing objects without the GIL, a 120-s run on 2
cores broke the stub within about 4,000 streams.

    .venv/bin/python scripts/stress_llm_stub.py --model-repository .cache/model_repository/cpu --seconds 120

Not a test (tests/e2e/test_stub_churn.py is the short version in make test).
"""
from __future__ import annotations

import argparse
import collections
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident.child_process import free_port  # noqa: E402

BAD_LINES = ("malloc", "pybind11", "double free", "corrupted", "Signal (", "terminate called")


def abort_lines(log_text: str) -> list[str]:
    """The lines of a Triton log that tell of a stub abort or a corrupted heap."""
    return [line for line in log_text.splitlines() if any(b in line for b in BAD_LINES)]


def churn(grpc_url: str, *, seconds: float, clients: int) -> tuple[collections.Counter, list[str]]:
    """``clients`` threads open 3-token greedy streams to ``llm`` one after another for
    ``seconds``; every other stream names ``text_output`` as its only output. Returns how many
    streams produced each text, and what went wrong (an error, or outputs sent that were not
    asked for); a client pauses 0.1 s after a failure and goes on."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2_grpc

    from gateway.triton_codec import build_infer_request

    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(grpc_url))
    inputs = {"text_input": np.array([[b"1, 2, 3, 4,"]], dtype=object), "max_tokens": np.array([[3]], np.int32),
              "temperature": np.array([[0.0]], np.float32), "stream": np.array([[True]])}
    texts: collections.Counter = collections.Counter()
    failures: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def one(request) -> str:
        text, names = "", set()
        for response in stub.ModelStreamInfer(iter((request,)), timeout=60):
            if response.error_message:
                raise RuntimeError(response.error_message)
            infer = response.infer_response
            for tensor, raw in zip(infer.outputs, infer.raw_output_contents):
                names.add(tensor.name)
                if tensor.name == "text_output":
                    text += raw[4:].decode()
        if request.outputs and names - {"text_output"}:
            raise RuntimeError(f"outputs not asked for were sent: {names}")
        return text

    def client(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            request = build_infer_request("llm", inputs)
            if (k + i) % 2:
                request.outputs.add().name = "text_output"
            i += 1
            try:
                text = one(request)
            except Exception as exc:  # noqa: BLE001 - counted, reported
                with lock:
                    failures.append(repr(exc))
                time.sleep(0.1)
                continue
            with lock:
                texts[text] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return texts, failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / ".cache/model_repository/cpu")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--clients", type=int, default=48)
    args = p.parse_args()

    from trident.triton_launcher import TritonPorts, TritonServer

    work = Path(tempfile.mkdtemp(prefix="stress-llm-"))
    triton = TritonServer(model_repository=args.model_repository, work_dir=work,
                          ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
    triton.start(timeout=600)
    print(f"Triton log: {triton.log_path}", flush=True)
    try:
        texts, failures = churn(triton.grpc_url, seconds=args.seconds, clients=args.clients)
        bad = abort_lines(Path(triton.log_path).read_text(errors="replace"))  # before the stop's own signal line
    finally:
        triton.stop()
    print(f"{sum(texts.values())} streams, {len(failures)} errors in {args.seconds:g} s; "
          f"{len(bad)} abort/corruption lines in Triton's log{': ' + bad[0] if bad else ''}")
    if bad or failures:
        print(f"kept for inspection: {work}")
        return 1
    shutil.rmtree(work, ignore_errors=True)  # a clean run leaves nothing behind
    return 0


if __name__ == "__main__":
    sys.exit(main())
