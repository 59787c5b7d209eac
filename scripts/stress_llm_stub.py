#!/usr/bin/env python3
"""Churn of short streams straight to the ``llm`` model, to check that its Python-backend stub
survives (docs/architecture.md, "Objects the Python-backend stub frees").

Starts Triton on a repository, then CLIENTS threads each open 3-token streams to ``llm`` over
gRPC one after another for SECONDS; every other stream asks for ``text_output`` only. Prints the
streams completed, the errors, and any heap-corruption or abort line of Triton's log. Before the
adapters kept clear of Triton 2.51's stub freeing objects without the GIL, a 120-s run on 2
cores broke the stub within about 4,000 streams.

    .venv/bin/python scripts/stress_llm_stub.py --model-repository .cache/model_repository/cpu --seconds 120

Not a test (tests/e2e/test_stub_churn.py is the short version in make test).
"""
from __future__ import annotations

import argparse
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BAD_LINES = ("malloc", "pybind11", "double free", "corrupted", "Signal (", "terminate called")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / ".cache/model_repository/cpu")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--clients", type=int, default=48)
    args = p.parse_args()

    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2_grpc

    from gateway.triton_codec import build_infer_request
    from trident.triton_launcher import TritonPorts, TritonServer

    work = Path(tempfile.mkdtemp(prefix="stress-llm-"))
    triton = TritonServer(model_repository=args.model_repository, work_dir=work,
                          ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
    triton.start(timeout=600)
    print(f"Triton log: {triton.log_path}", flush=True)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(triton.grpc_url))
    inputs = {"text_input": np.array([[b"1, 2, 3, 4,"]], dtype=object), "max_tokens": np.array([[3]], np.int32),
              "temperature": np.array([[0.0]], np.float32), "stream": np.array([[True]])}
    counts = {"streams": 0, "errors": 0}
    lock = threading.Lock()
    stop = time.monotonic() + args.seconds

    def client(k: int) -> None:
        i = 0
        while time.monotonic() < stop:
            request = build_infer_request("llm", inputs)
            if (k + i) % 2:
                request.outputs.add().name = "text_output"
            i += 1
            try:
                failed = any(r.error_message for r in stub.ModelStreamInfer(iter((request,)), timeout=60))
            except grpc.RpcError:
                failed = True
            with lock:
                counts["errors" if failed else "streams"] += 1
            if failed:
                time.sleep(0.1)

    try:
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log = Path(triton.log_path).read_text(errors="replace").splitlines()  # before the stop's own signal line
    finally:
        triton.stop()
    bad = [line for line in log if any(b in line for b in BAD_LINES)]
    print(f"{counts['streams']} streams, {counts['errors']} errors in {args.seconds:g} s; "
          f"{len(bad)} abort/corruption lines in Triton's log{': ' + bad[0] if bad else ''}")
    return 1 if bad or counts["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
