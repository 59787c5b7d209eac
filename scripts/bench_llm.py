#!/usr/bin/env python3
"""The ``llm`` model at GPU-like rates: its CPU per token and what it relays, against the engine.

On a GPU, TensorRT-LLM's in-flight batcher streams tens of thousands of tokens a second, and every
one of them goes through the ``llm`` model (a Python-backend model: detokenization, stop
sequences, cancellation) before the gateway. The CPU engine cannot make tokens that fast, so
this benchmark puts an echo engine in its place (scripts/bench/echo_engine: the engine model's
tensors, ``slots`` requests decoding at once, one token per tick each, no compute) behind the
CPU repository's real ``llm`` model, and measures, on one Triton, for each number of open streams:

* ``engine``: a plain Python gRPC client (grpc.aio) streaming straight from the echo engine,
  one token a response, as ``llm`` reads it (the floor: Triton and the engine alone);
* ``llm xI``: the same streams through ``llm`` with I instances (one stub process each), as the
  gateway sends them (each asks for its admission response and carries a cancel token).

Per row: CPU per relayed token of each part (Triton's own process, the ``llm`` stubs, the
engine's stub), relayed tokens/s against offered, time to first token and the gap between
responses at the client (p50/p99), and how busy the machine was. With ``--rounds N`` each way is
measured N times, alternating, and the table gives medians.

    .venv/bin/python scripts/bench_llm.py --streams 64,256 --llm-instances 1,2 --rounds 3
    .venv/bin/python scripts/bench_llm.py --repository-only /tmp/echo-repo --slots 128
        # only writes the repository: scripts/load_streams.py --model-repository /tmp/echo-repo
        # then measures first tokens at 1x, 2x, 4x the slots in front of the echo engine

Not a test: it prints numbers for a person to read. On this 2-core machine the engine, Triton,
``llm`` and the client share two cores, so the relayed rate is the machine's; the CPU per token
of each part is what carries over to a larger one.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import load_streams  # noqa: E402  (scripts/ is this script's path)
from bench_gateway import PACING, cpu_flags, machine_busy, run_client  # noqa: E402

from trident.child_process import free_port  # noqa: E402
from trident.fsutil import scratch_dir  # noqa: E402
from trident.triton_launcher import TritonPorts, TritonServer  # noqa: E402

ECHO_ENGINE = ROOT / "scripts" / "bench" / "echo_engine"


def _set_parameter(text: str, key: str, value: str) -> str:
    """``text`` (a config.pbtxt) with parameter ``key`` set to ``value`` (added when missing)."""
    pattern = re.compile(r'(key:\s*"' + re.escape(key) + r'"\s*value:\s*\{\s*string_value:\s*")[^"]*(")')
    if pattern.search(text):
        return pattern.sub(lambda m: m.group(1) + value + m.group(2), text, count=1)
    return text + f'\nparameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'


def echo_engine_repository(dest: Path, source: Path, *, slots: int, interval_ms: float, llm_instances: int = 1,
                           max_concurrent: int = 256, stream_interval: int | None = None) -> Path:
    """A repository with ``source``'s ``llm`` model (``llm_instances`` instances, ``max_concurrent``
    engine streams each, ``stream_interval`` when given) in front of the echo engine, named as the
    engine model (``tensorrt_llm``, with the source engine's config: the same inputs and outputs)."""
    shutil.copytree(source / "llm", dest / "llm", ignore=shutil.ignore_patterns("__pycache__"))
    config = dest / "llm" / "config.pbtxt"
    text, n = re.subn(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", rf"\g<1>{llm_instances}", config.read_text())
    if n != 1:
        raise ValueError(f"no instance_group count in {source / 'llm' / 'config.pbtxt'}")
    text = _set_parameter(text, "max_concurrent_requests", str(max_concurrent))
    if stream_interval is not None:
        text = _set_parameter(text, "stream_interval", str(stream_interval))
    config.write_text(text)
    engine = dest / "tensorrt_llm"
    (engine / "1").mkdir(parents=True)
    text = (source / "tensorrt_llm" / "config.pbtxt").read_text()
    text = _set_parameter(_set_parameter(text, "max_batch_size", str(slots)), "interval_ms", f"{interval_ms:g}")
    text = re.sub(r"^max_batch_size:\s*\d+", f"max_batch_size: {slots}", text, flags=re.M)  # load_streams reads it
    (engine / "config.pbtxt").write_text(text)
    shutil.copy(ECHO_ENGINE / "1" / "model.py", engine / "1" / "model.py")
    shutil.copy(PACING, engine / "1" / "pacing.py")
    return dest


def cpu_by_part(triton: TritonServer) -> dict[str, float]:
    """CPU seconds so far of Triton's own process and of each model's stubs, by model: load_streams'
    count over Triton's process group, the stubs named as their models."""
    parts = load_streams.cpu_by_part({"triton": triton.process.pid})  # Triton runs in a session of its own
    return {part.removeprefix("stub "): cpu for part, cpu in parts.items()}


def measure(triton: TritonServer, way: str, streams: int, tokens: int, pace_ms: float) -> dict:
    c0, b0 = cpu_by_part(triton), machine_busy()
    result = run_client([way, "--url", triton.grpc_url, "--streams", str(streams), "--tokens", str(tokens)])
    c1, b1 = cpu_by_part(triton), machine_busy()
    n = max(result["tokens"], 1)
    return {"way": way, "streams": streams, "tokens_per_stream": tokens, "pace_ms": pace_ms,
            "tokens": result["tokens"], "errors": result["errors"],
            "cpu_us_per_token": {part: (c1[part] - c0.get(part, 0.0)) / n * 1e6 for part in c1},
            "relayed_per_s": result["tokens"] / result["wall_s"] if result["wall_s"] else 0.0,
            "offered_per_s": streams * 1000.0 / pace_ms, "ttft_ms": result["ttft_ms"], "gap_ms": result["gap_ms"],
            "client_cpu_us_per_token": result["cpu_s"] / n * 1e6,
            "machine_busy": (b1[0] - b0[0]) / max(b1[1] - b0[1], 1)}


def sweep(args) -> list[dict]:
    """Each number of ``llm`` instances on a Triton of its own; on it, for each number of open
    streams and each round, the engine-direct floor and ``llm`` in turn, in the opposite order
    every other round."""
    with scratch_dir("bench-llm-") as work:  # removed after a run, kept with its logs after a failure
        return _sweep(args, work)


def _sweep(args, work: Path) -> list[dict]:
    rows = []
    for instances in args.llm_instances:
        repo = echo_engine_repository(work / f"repo-{instances}", args.source, slots=args.slots,
                                      interval_ms=args.pace_ms, llm_instances=instances,
                                      max_concurrent=max(args.streams), stream_interval=args.llm_stream_interval)
        triton = TritonServer(model_repository=repo, work_dir=work / f"triton-{instances}",
                              ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
        print(f"Triton with llm x{instances} (log {triton.log_path})", flush=True)
        triton.start(timeout=300)
        try:
            run_client(["llm", "--url", triton.grpc_url, "--streams", "8", "--tokens", "8"])  # warm-up
            for streams in args.streams:
                tokens = max(20, int(args.seconds * 1000 / args.pace_ms))
                for round_ in range(1, args.rounds + 1):
                    ways = ["engine", "llm"] if round_ % 2 else ["llm", "engine"]
                    for way in ways:
                        row = measure(triton, way, streams, tokens, args.pace_ms)
                        row.update(round=round_, llm_instances=instances)
                        rows.append(row)
                        report(row)
        finally:
            triton.stop()
    return rows


def report(row: dict) -> None:
    cpu = row["cpu_us_per_token"]
    name = "engine" if row["way"] == "engine" else f"llm x{row['llm_instances']}"
    parts = "  ".join(f"{part} {us:.0f}" for part, us in sorted(cpu.items()))
    print(f"  round {row['round']}  {row['streams']:4d} streams  {name:8s}  us/token: {parts}  "
          f"{row['relayed_per_s']:6.0f}/{row['offered_per_s']:.0f} tok/s  ttft p50 {row['ttft_ms'].get('p50', 0):6.1f} ms  "
          f"gap p50/p99 {row['gap_ms'].get('p50', 0):5.1f}/{row['gap_ms'].get('p99', 0):6.1f} ms  "
          f"errors {row['errors']}  machine {row['machine_busy']:.0%}", flush=True)


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (llm instances, streams, way), in the order first measured: medians over the
    rounds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["llm_instances"], r["streams"], r["way"]), []).append(r)
    out = []
    for (instances, streams, way), mine in groups.items():
        med = lambda get: statistics.median(get(r) for r in mine)  # noqa: E731
        parts = sorted({p for r in mine for p in r["cpu_us_per_token"]})
        out.append({"llm_instances": instances, "streams": streams, "way": way, "rounds": len(mine),
                    "pace_ms": mine[0]["pace_ms"], "offered_per_s": mine[0]["offered_per_s"],
                    "cpu_us_per_token": {p: med(lambda r: r["cpu_us_per_token"].get(p, 0.0)) for p in parts},
                    "relayed_per_s": med(lambda r: r["relayed_per_s"]),
                    "ttft_p50_ms": med(lambda r: r["ttft_ms"].get("p50", 0)),
                    "ttft_p99_ms": med(lambda r: r["ttft_ms"].get("p99", 0)),
                    "gap_p50_ms": med(lambda r: r["gap_ms"].get("p50", 0)),
                    "gap_p99_ms": med(lambda r: r["gap_ms"].get("p99", 0)),
                    "errors": sum(r["errors"] for r in mine),
                    "machine_busy": med(lambda r: r["machine_busy"])})
    return out


def table(rows: list[dict]) -> str:
    summary = summarize(rows)
    lines = ["| streams (pace) | way | CPU per token: Triton / llm / engine stub | relayed / offered tok/s "
             "| TTFT p50 / p99 | gap p50 / p99 | errors | machine busy |",
             "|---|---|---|---|---|---|---|---|"]
    rounds = max(r["rounds"] for r in summary)
    if rounds > 1:
        lines.insert(0, f"Medians over {rounds} rounds.\n")
    for r in summary:
        cpu = r["cpu_us_per_token"]
        name = "engine direct" if r["way"] == "engine" else f"through llm, {r['llm_instances']} instance(s)"
        llm = f"{cpu.get('llm', 0.0):.0f}" if r["way"] == "llm" else "-"
        lines.append(f"| {r['streams']} ({r['pace_ms']:g} ms) | {name} | {cpu.get('triton', 0.0):.0f} / {llm} / "
                     f"{cpu.get('tensorrt_llm', 0.0):.0f} us | {r['relayed_per_s']:.0f} / {r['offered_per_s']:.0f} | "
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms | {r['gap_p50_ms']:.1f} / "
                     f"{r['gap_p99_ms']:.1f} ms | {r['errors']} | {r['machine_busy']:.0%} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--source", type=Path, default=ROOT / ".cache/model_repository/cpu",
                   help="the repository whose llm model (and engine config) is measured")
    p.add_argument("--streams", type=ints, default=[64, 256])
    p.add_argument("--slots", type=int, default=256, help="requests the echo engine decodes at once")
    p.add_argument("--pace-ms", type=float, default=40.0, help="the echo engine's step: a token per slot each")
    p.add_argument("--seconds", type=float, default=6.0, help="how long each stream runs (sets the tokens)")
    p.add_argument("--llm-instances", type=ints, default=[1, 2])
    p.add_argument("--llm-stream-interval", type=int,
                   help="llm's stream_interval (engine tokens per text response; default: the source's)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--repository-only", type=Path, metavar="DIR",
                   help="only write the echo-engine repository (llm x the first --llm-instances) to DIR")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if args.repository_only:
        echo_engine_repository(args.repository_only, args.source, slots=args.slots, interval_ms=args.pace_ms,
                               llm_instances=args.llm_instances[0], stream_interval=args.llm_stream_interval)
        print(args.repository_only)
        return 0
    print(f"{os.cpu_count()} CPUs ({cpu_flags()}); streams {args.streams}; {args.slots} engine slots, a step every "
          f"{args.pace_ms:g} ms; llm instances {args.llm_instances}; llm stream_interval "
          f"{args.llm_stream_interval or 'as in ' + str(args.source)}; rounds {args.rounds}", flush=True)
    rows = sweep(args)
    print("\n" + table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
