#!/usr/bin/env python3
"""Streaming under load: first-token times at 1x, 2x and 4x the engine's batch size.

Sends N concurrent streaming requests (the same counting prompt, greedy, T tokens each) three
ways, one after the other in the same run, and prints first-token earliest / p50 / p99 / latest:

* ``gateway``  POST /generate with "stream": true, through the real gateway (gunicorn + gevent);
* ``llm``      Triton gRPC straight to the text-level ``llm`` model;
* ``engine``   Triton gRPC straight to the engine model ``tensorrt_llm`` (token ids in and out).

"first batch" is the p50 of the first ``batch`` first tokens: the streams the engine admits at
once. Streaming holds under load when the first batch's tokens arrive as fast at 2x and 4x as
at 1x (the engine alone sets the floor); the later streams wait for a slot, as they should.
"first batch admitted" is when the ``batch``-th request had been admitted by ``llm`` (through
the gateway: its client had its 200; straight to ``llm``: its admission response, which the
gateway asks for too): how fast the serving layers let a burst in.
Every way and multiple runs ``--rounds`` times (3), the ways in alternating order; the table
gives the median of each figure and each round's ratio to the engine-direct first batch of the
same round: on a shared machine one round's ratio can be off by 2x.

    make load-streams                          # starts Triton and the gateway on the CPU repository
    .venv/bin/python scripts/load_streams.py --grpc-url host:8001 --gateway-url http://host:8080 --api-key K

Not a test: it prints numbers for a person to read (the tests check behaviour, not time).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident.child_process import free_port, process_cpu  # noqa: E402
from trident.fsutil import scratch_dir  # noqa: E402

PROMPT = "1, 2, 3, 4, 5, 6,"  # the model counts on: every request makes all its tokens


def quantiles(values: list[float]) -> dict[str, float]:
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, int(round(q * (len(v) - 1))))]  # noqa: E731
    return {"min": v[0], "p50": statistics.median(v), "p99": pick(0.99), "max": v[-1]}


def run_concurrently(n: int, one) -> list[float | None]:
    """Start n threads at once (behind a barrier); each returns its first-token time."""
    firsts: list[float | None] = [None] * n
    barrier = threading.Barrier(n + 1)
    t0 = [0.0]

    def worker(i: int) -> None:
        barrier.wait()
        try:
            firsts[i] = one(t0[0])
        except Exception as exc:  # reported, not fatal: the table says how many answered
            print(f"  stream {i}: {type(exc).__name__}: {exc}", file=sys.stderr)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    t0[0] = time.perf_counter()
    barrier.wait()
    for t in threads:
        t.join(timeout=900)
    return firsts


def grpc_stream(stub, model: str, inputs: dict, t0: float, admitted: list[float] | None = None) -> float:
    """One stream straight to a model over Triton's gRPC; with ``admitted``, asks ``llm`` for its
    admission response (as the gateway does) and appends its time there."""
    from gateway.triton_codec import FINAL_FLAG, build_infer_request

    first = None
    request = build_infer_request(model, inputs, admission=admitted is not None)
    call = stub.ModelStreamInfer(iter((request,)), timeout=900)
    for response in call:
        if response.error_message:
            raise RuntimeError(response.error_message)
        if admitted is not None:
            admitted.append(time.perf_counter() - t0)  # the first response: the admission
            admitted = None
        infer = response.infer_response
        for out, raw in zip(infer.outputs, infer.raw_output_contents):
            has_token = len(raw) > 4 if out.name == "text_output" else (out.name == "output_ids" and len(raw) > 0)
            if first is None and has_token:
                first = time.perf_counter() - t0
        if infer.parameters[FINAL_FLAG].bool_param:
            for _ in call:  # let the server end the call (an open one keeps the model loaded)
                pass
            break
    return first


def gateway_stream(url: str, key: str, tokens: int, t0: float, admitted: list[float]) -> float:
    """One SSE stream over the standard library's http.client, the lightest client at hand: the
    clients share the machine's cores with the servers (the table prints their CPU). Appends the
    time of its 200 (sent once ``llm`` admitted the request) to ``admitted``."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    body = json.dumps({"prompt": PROMPT, "max_new_tokens": tokens, "temperature": 0, "stream": True})
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=900)
    first = None
    try:
        conn.request("POST", "/generate", body=body,
                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        admitted.append(time.perf_counter() - t0)
        for line in response:
            if first is None and line.startswith(b"event: token"):
                first = time.perf_counter() - t0
            if line.startswith(b"event: error"):
                raise RuntimeError("error event")
    finally:
        conn.close()
    return first


def cpu_by_part(groups: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far of the servers this script started, by part: each server runs in its
    own session (trident.child_process.spawn), so its process group holds all its processes;
    Triton's Python-backend stubs are counted by model."""
    parts: dict[str, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            group, cpu = process_cpu(int(entry.name))
            server = next((name for name, pgid in groups.items() if pgid == group), None)
            if server is None:
                continue
            part = server
            args = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            if b"triton_python_backend_stub" in args[0] and len(args) > 1:
                part = "stub " + Path(args[1].decode()).parent.parent.name  # <repo>/<model>/1/model.py
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        parts[part] = parts.get(part, 0.0) + cpu
    return parts


def engine_batch_size(repo: Path) -> int:
    text = (repo / "tensorrt_llm" / "config.pbtxt").read_text()
    return int(re.search(r"^max_batch_size:\s*(\d+)", text, re.M).group(1))


def measure(args, batch: int, groups: dict[str, int]) -> list[dict]:
    import grpc
    import numpy as np
    from transformers import AutoTokenizer
    from tritonclient.grpc import service_pb2_grpc

    tok = AutoTokenizer.from_pretrained(str(args.tokenizer_dir))
    ids = tok(PROMPT).input_ids
    stub = service_pb2_grpc.GRPCInferenceServiceStub(
        grpc.insecure_channel(args.grpc_url, options=[("grpc.max_receive_message_length", -1)]))
    llm_inputs = {"text_input": np.array([[PROMPT.encode()]], dtype=object),
                  "max_tokens": np.array([[args.tokens]], np.int32),
                  "temperature": np.array([[0.0]], np.float32), "stream": np.array([[True]])}
    engine_inputs = {"input_ids": np.array([ids], np.int32), "input_lengths": np.array([[len(ids)]], np.int32),
                     "request_output_len": np.array([[args.tokens]], np.int32), "streaming": np.array([[True]]),
                     "runtime_top_k": np.array([[1]], np.int32)}
    ways = {
        "engine": lambda t0: grpc_stream(stub, "tensorrt_llm", engine_inputs, t0),
        "llm": lambda t0: grpc_stream(stub, "llm", llm_inputs, t0, admitted),
        "gateway": lambda t0: gateway_stream(args.gateway_url, args.api_key, args.tokens, t0, admitted),
    }
    admitted: list[float] = []  # the admissions of the run in progress (gateway, llm)
    # The first requests of a fresh server pay one-time costs (the engine's first batches, lazy
    # imports, connection set-up): one round at the batch size, per way, before measuring.
    for way in args.ways:
        run_concurrently(batch, ways[way])
    rows = []
    for round_ in range(1, args.rounds + 1):
        # Every way once per multiple in each round, in the opposite order every other round, so
        # that no way always runs first (or last) after a pause: the machine's speed drifts.
        order = list(args.ways) if round_ % 2 else list(reversed(args.ways))
        for mult in args.multiples:
            n = batch * mult
            for way in order:
                before, servers_before = os.times(), cpu_by_part(groups)
                admitted.clear()
                firsts = run_concurrently(n, ways[way])
                after, servers_after = os.times(), cpu_by_part(groups)
                client_ms = (after.user + after.system - before.user - before.system) * 1000 / n
                server_ms = {part: (cpu - servers_before.get(part, 0.0)) * 1000 / n
                             for part, cpu in servers_after.items()}
                got = sorted(f for f in firsts if f is not None)
                if not got:
                    rows.append({"round": round_, "way": way, "streams": n, "answered": 0})
                    continue
                row = {"round": round_, "way": way, "streams": n, "answered": len(got), **quantiles(got),
                       "first_batch_p50": statistics.median(got[:batch]), "client_cpu_ms": client_ms,
                       "server_cpu_ms": server_ms}
                if len(admitted) >= batch:
                    row["first_batch_admitted"] = sorted(admitted)[batch - 1]
                rows.append(row)
                print(f"  round {round_} {way:8s} {n:4d} streams: first token min {row['min']:.2f} "
                      f"p50 {row['p50']:.2f} p99 {row['p99']:.2f} max {row['max']:.2f} s; first batch p50 "
                      f"{row['first_batch_p50']:.2f} s{_admitted_note(row)} ({len(got)}/{n} answered; "
                      f"client CPU {client_ms:.1f} ms a stream)",
                      flush=True)
    return rows


def _admitted_note(row: dict) -> str:
    return f", admitted by {row['first_batch_admitted']:.2f} s" if "first_batch_admitted" in row else ""


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (streams, way), in the order measured: the median over the rounds of each
    figure, and each round's ratio of the first batch to the engine-direct one of that round."""
    engine = {(r["round"], r["streams"]): r for r in rows if r["way"] == "engine" and r.get("answered")}
    keys = list(dict.fromkeys((r["streams"], r["way"]) for r in rows))
    out = []
    for streams, way in keys:
        mine = [r for r in rows if (r["streams"], r["way"]) == (streams, way)]
        done = [r for r in mine if r.get("answered")]
        summary = {"streams": streams, "way": way, "rounds": len(mine), "answered_rounds": len(done)}
        if done:
            for field in ("min", "p50", "p99", "max", "first_batch_p50", "client_cpu_ms"):
                summary[field] = statistics.median(r[field] for r in done)
            if all("first_batch_admitted" in r for r in done):
                summary["first_batch_admitted"] = statistics.median(r["first_batch_admitted"] for r in done)
            parts = {part for r in done for part in r["server_cpu_ms"]}
            summary["server_cpu_ms"] = {part: statistics.median(r["server_cpu_ms"].get(part, 0.0) for r in done)
                                        for part in parts}
            summary["vs_engine"] = [r["first_batch_p50"] / engine[(r["round"], streams)]["first_batch_p50"]
                                    for r in done if (r["round"], streams) in engine]
        out.append(summary)
    return out


def print_table(summary: list[dict], batch: int, rounds: int) -> None:
    """The tables of ``summarize``'s rows."""
    print(f"\nengine batch size {batch}; {rounds} round(s), the median of each figure over them: first-token "
          "seconds (min / p50 / p99 / max), first batch p50, its ratio to the engine-direct first batch of the "
          "same round (each round, then their median), when llm had admitted the first batch (gateway, llm), "
          "and this script's own CPU per stream (the clients share the machine with the servers)\n")
    print("| streams | through | min / p50 / p99 / max | first batch p50 | vs engine, each round | vs engine |"
          " first batch admitted | client CPU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary:
        if not r["answered_rounds"]:
            print(f"| {r['streams']} | {r['way']} | no answer | | | | | |")
            continue
        missing = r["rounds"] - r["answered_rounds"]
        way = r["way"] + (f" ({missing} of {r['rounds']} rounds unanswered)" if missing else "")
        ratios = r["vs_engine"]
        each = " / ".join(f"{x:.2f}x" for x in ratios) if ratios else "-"
        median = f"{statistics.median(ratios):.2f}x" if ratios else "-"
        admitted = f"{r['first_batch_admitted']:.2f}" if "first_batch_admitted" in r else "-"
        print(f"| {r['streams']} | {way} | {r['min']:.2f} / {r['p50']:.2f} / {r['p99']:.2f} / {r['max']:.2f}"
              f" | {r['first_batch_p50']:.2f} | {each} | {median} | {admitted} | {r['client_cpu_ms']:.1f} ms |")
    parts = sorted({part for r in summary for part in r.get("server_cpu_ms", {})})
    if parts:
        print("\nCPU per stream (ms), by process, over each whole round, median over the rounds (the servers "
              "this script started; a Python-backend stub by its model)\n")
        print("| streams | through | " + " | ".join(parts) + " | client |")
        print("|---|---|" + "---|" * (len(parts) + 1))
        for r in summary:
            if r["answered_rounds"]:
                cells = " | ".join(f"{r['server_cpu_ms'].get(part, 0.0):.2f}" for part in parts)
                print(f"| {r['streams']} | {r['way']} | {cells} | {r['client_cpu_ms']:.2f} |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-repository", type=Path, default=ROOT / ".cache/model_repository/cpu",
                   help="repository to serve (when this script starts Triton) and to read the batch size from")
    p.add_argument("--tokenizer-dir", type=Path, default=ROOT / ".cache/models/smollm2-135m-instruct")
    p.add_argument("--grpc-url", help="a running Triton (default: start one)")
    p.add_argument("--gateway-url", help="a running gateway (default: start one)")
    p.add_argument("--api-key", default=os.environ.get("TRIDENT_API_KEY", ""))
    p.add_argument("--batch", type=int, help="the engine's batch size (default: read from the repository)")
    p.add_argument("--multiples", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--ways", type=lambda s: s.split(","), default=["engine", "llm", "gateway"])
    p.add_argument("--tokens", type=int, default=64, help="tokens per request")
    p.add_argument("--rounds", type=int, default=3,
                   help="measure every way and multiple this many times, alternating the order of the ways "
                        "(this machine's speed drifts between runs: one round's ratio can be off by 2x)")
    p.add_argument("--gateway-workers", type=int, default=1, help="gunicorn workers of the gateway this script starts")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    batch = args.batch or engine_batch_size(args.model_repository)

    started = []
    groups: dict[str, int] = {}  # server -> process group, for the CPU table
    with scratch_dir("load-streams-") as work:  # removed after a run, kept with its logs after a failure
        try:
            if not args.grpc_url:
                from trident.triton_launcher import TritonPorts, TritonServer

                triton = TritonServer(model_repository=args.model_repository, work_dir=work / "triton",
                                      ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
                started.append(triton)
                print(f"starting Triton on {args.model_repository} (log {triton.log_path})", flush=True)
                triton.start(timeout=600)
                args.grpc_url = triton.grpc_url
                groups["triton"] = triton.process.pid
            if not args.gateway_url and "gateway" in args.ways:
                from trident.gateway_process import GatewayProcess

                args.api_key = args.api_key or "load-" + os.urandom(8).hex()
                gw = GatewayProcess(port=free_port(), triton_grpc_url=args.grpc_url, workers=args.gateway_workers,
                                    log_path=work / "gateway.log",
                                    # Every stream admitted (the default limit, 256, would answer 503 beyond it):
                                    # the streams beyond the engine's slots are to wait in llm and the engine.
                                    extra_env={"TRIDENT_API_KEY": args.api_key, "TRIDENT_LOG_FORMAT": "text",
                                               "TRIDENT_MAX_IN_FLIGHT": str(batch * max(args.multiples))})
                started.append(gw)
                gw.start(timeout=60)
                args.gateway_url = gw.url
                groups["gateway"] = gw.process.pid
            print(f"{batch} engine slots; {args.tokens} tokens a stream; multiples {args.multiples}", flush=True)
            rows = measure(args, batch, groups)
            summary = summarize(rows)
            print_table(summary, batch, args.rounds)
            if args.json:
                args.json.write_text(json.dumps({"batch": batch, "tokens": args.tokens, "rows": rows,
                                                 "summary": summary}, indent=1))
        finally:
            for server in reversed(started):
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
