#!/usr/bin/env python3
"""Gateway relay cost: CPU per relayed token, rates and added latency, against a gRPC floor.

In one run: Triton serving an echo model with the ``llm`` interface (scripts/bench/echo_llm:
every open stream gets a token per tick, no engine), then for each number of open streams

* ``floor``: a plain Python gRPC client (grpc.aio) consuming the streams straight from Triton;
* ``gateway xW``: the same streams through the gateway under gunicorn with W gevent workers,
  opened by a bare asyncio SSE client (scripts/bench/clients.py).

It prints, per row: the CPU seconds of the gateway's worker processes (or of the floor client)
per relayed token, relayed tokens/s against offered, time to first token and inter-token gap
(p50/p99) at the client and what the gateway adds over the floor (gaps are between
responses: with ``--stream-interval N`` a response carries N tokens), the ratio of the gateway's
CPU per token to the floor's, and how busy the machine was; it saves a plot and the JSON.

With ``--rounds N`` each relay is measured N times on the same Triton, alternating with the
floor; the table then gives medians, and the ratio to the floor is each round's gateway over that
round's floor (single runs move by 20-30 % on a shared machine).

    make bench-gateway                                   # the default sweep
    .venv/bin/python scripts/bench_gateway.py --streams 200 --workers 1 --seconds 5 --stream-interval 1,8
    .venv/bin/python scripts/bench_gateway.py --streams 200,500 --workers 1 --stream-interval 1,8 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident.child_process import free_port, process_cpu  # noqa: E402
from trident.fsutil import scratch_dir  # noqa: E402
from trident.gateway_process import GatewayProcess  # noqa: E402
from trident.repo_builder import fill_template  # noqa: E402
from trident.triton_launcher import TritonPorts, TritonServer  # noqa: E402

ECHO = ROOT / "scripts" / "bench" / "echo_llm"
CLIENTS = ROOT / "scripts" / "bench" / "clients.py"
PACING = ROOT / "scripts" / "bench" / "pacing.py"  # the echo models' step loop, next to their model.py


def pace_ms(streams: int) -> float:
    """A token every 20 ms per stream up to 200 streams; beyond, what the echo model (one Python
    thread sending every response over IPC) sustains on 2 cores: ~10,000 tokens/s offered."""
    return 20.0 if streams <= 200 else 20.0 * streams / 200


def echo_repository(dest: Path, interval_ms: float, stream_interval: int = 1) -> Path:
    model = dest / "llm"
    (model / "1").mkdir(parents=True)
    text = fill_template((ECHO / "config.pbtxt.in").read_text(),
                         {"interval_ms": f"{interval_ms:g}", "max_concurrent": 64, "stream_interval": stream_interval},
                         source="echo config")
    (model / "config.pbtxt").write_text(text)
    shutil.copy(ECHO / "1" / "model.py", model / "1" / "model.py")
    shutil.copy(PACING, model / "1" / "pacing.py")
    return dest


def cpu_flags() -> str:
    """The vector flags of this CPU that speed figures depend on (printed with every table)."""
    flags = Path("/proc/cpuinfo").read_text()
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16") if f in flags)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += process_cpu(pid)[1]
        except OSError:
            continue  # ended
    return total


def machine_busy() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def run_client(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(CLIENTS), *args], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"client failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measured(kind: str, streams: int, tokens: int, pace: float, result: dict, cpu: float, busy: float,
             workers: int = 0, stream_interval: int = 1) -> dict:
    relayed = result["tokens"] / result["wall_s"] if result["wall_s"] else 0.0
    return {"kind": kind, "workers": workers, "streams": streams, "stream_interval": stream_interval,
            "tokens_per_stream": tokens, "pace_ms": pace,
            "tokens": result["tokens"], "responses": result["responses"], "errors": result["errors"], "cpu_s": cpu,
            "cpu_us_per_token": cpu / max(result["tokens"], 1) * 1e6, "relayed_per_s": relayed,
            "offered_per_s": streams * 1000.0 / pace, "ttft_ms": result["ttft_ms"], "gap_ms": result["gap_ms"],
            "client_cpu_s": result["cpu_s"], "machine_busy": busy}


def sweep(args) -> list[dict]:
    """Every (streams, stream interval) on a Triton of its own; in each of ``args.rounds`` rounds
    the floor and each gateway in turn, in the opposite order every other round (the machine's
    speed drifts: no relay always runs first)."""
    with scratch_dir("bench-gateway-") as work:  # removed after a run, kept with its logs after a failure
        return _sweep(args, work)


def _sweep(args, work: Path) -> list[dict]:
    rows = []
    key = "bench-" + os.urandom(8).hex()
    for streams, interval in [(s, i) for s in args.streams for i in args.stream_interval]:
        pace = pace_ms(streams)
        tokens = max(20, int(args.seconds * 1000 / pace))
        repo = echo_repository(work / f"repo-{streams}-{interval}", pace, interval)
        triton = TritonServer(model_repository=repo, work_dir=work / f"triton-{streams}-{interval}",
                              ports=TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port()))
        triton.start(timeout=120)
        try:
            relays = [0, *args.workers]  # 0: the floor client
            for round_ in range(1, args.rounds + 1):
                for w in relays if round_ % 2 else reversed(relays):
                    row = (measure_floor(triton, streams, tokens, pace, interval) if w == 0 else
                           measure_gateway(triton, w, key, work, streams, tokens, pace, interval))
                    row["round"] = round_
                    rows.append(row)
                    report(row)
        finally:
            triton.stop()
    return rows


def measure_floor(triton: TritonServer, streams: int, tokens: int, pace: float, interval: int) -> dict:
    b0 = machine_busy()
    result = run_client(["grpc", "--url", triton.grpc_url, "--streams", str(streams), "--tokens", str(tokens)])
    b1 = machine_busy()
    return measured("floor", streams, tokens, pace, result, result["cpu_s"],
                    (b1[0] - b0[0]) / max(b1[1] - b0[1], 1), stream_interval=interval)


def measure_gateway(triton: TritonServer, workers: int, key: str, work: Path, streams: int, tokens: int,
                    pace: float, interval: int) -> dict:
    gw = GatewayProcess(port=free_port(), triton_grpc_url=triton.grpc_url, workers=workers,
                        log_path=work / f"gateway-{streams}-{interval}-{workers}.log",
                        extra_env={"TRIDENT_API_KEY": key, "TRIDENT_MAX_IN_FLIGHT": "0",
                                   "TRIDENT_LOG_FORMAT": "text"})
    gw.start(timeout=60)
    try:
        time.sleep(1.0)  # workers booted
        pids = children(gw.process.pid)
        c0, b0 = cpu_seconds(pids), machine_busy()
        result = run_client(["sse", "--url", gw.url, "--key", key, "--streams", str(streams),
                             "--tokens", str(tokens)])
        c1, b1 = cpu_seconds(pids), machine_busy()
    finally:
        gw.stop()
    return measured("gateway", streams, tokens, pace, result, c1 - c0,
                    (b1[0] - b0[0]) / max(b1[1] - b0[1], 1), workers=workers, stream_interval=interval)


def report(row: dict) -> None:
    name = "floor (gRPC)" if row["kind"] == "floor" else f"gateway x{row['workers']}"
    print(f"  round {row['round']}  {row['streams']:5d} streams  {row['stream_interval']:2d} tok/resp  {name:13s} "
          f"{row['cpu_us_per_token']:7.0f} us/token  "
          f"{row['relayed_per_s']:7.0f}/{row['offered_per_s']:.0f} tok/s  "
          f"ttft p50 {row['ttft_ms'].get('p50', 0):6.1f} ms  gap p50/p99 {row['gap_ms'].get('p50', 0):5.1f}/"
          f"{row['gap_ms'].get('p99', 0):6.1f} ms  errors {row['errors']}  machine {row['machine_busy']:.0%}",
          flush=True)


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (streams, stream interval, relay), in the order first measured: the median
    over the rounds of each figure, and ``ratios``, each round's CPU per token over the floor's
    of the same round (``vs_floor``: their median)."""
    floors = {(r["streams"], r["stream_interval"], r["round"]): r for r in rows if r["kind"] == "floor"}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["streams"], r["stream_interval"], r["kind"], r["workers"]), []).append(r)
    out = []
    for (streams, interval, kind, workers), mine in groups.items():
        med = lambda get: statistics.median(get(r) for r in mine)  # noqa: E731
        ratios = [r["cpu_us_per_token"] / floors[(streams, interval, r["round"])]["cpu_us_per_token"] for r in mine]
        out.append({
            "kind": kind, "workers": workers, "streams": streams, "stream_interval": interval,
            "pace_ms": mine[0]["pace_ms"], "offered_per_s": mine[0]["offered_per_s"], "rounds": len(mine),
            "cpu_us_per_token": med(lambda r: r["cpu_us_per_token"]),
            "each_cpu_us_per_token": [r["cpu_us_per_token"] for r in mine],
            "relayed_per_s": med(lambda r: r["relayed_per_s"]),
            "ttft_p50_ms": med(lambda r: r["ttft_ms"].get("p50", 0)),
            "gap_p50_ms": med(lambda r: r["gap_ms"].get("p50", 0)),
            "gap_p99_ms": med(lambda r: r["gap_ms"].get("p99", 0)),
            "machine_busy": med(lambda r: r["machine_busy"]),
            "ratios": ratios, "vs_floor": statistics.median(ratios),
        })
    return out


def table(rows: list[dict]) -> str:
    """The markdown table of :func:`summarize`'s rows: with several rounds each figure is the
    median, and the ratio to the floor is followed by each round's."""
    summary = summarize(rows)
    several = any(r["rounds"] > 1 for r in summary)
    floors = {(r["streams"], r["stream_interval"]): r for r in summary if r["kind"] == "floor"}
    lines = ["| streams (pace) | tokens / response | relay | CPU per token | vs floor | relayed / offered tok/s "
             "| TTFT p50 (+gateway) | gap p50 / p99 (+gateway p99) | machine busy |",
             "|---|---|---|---|---|---|---|---|---|"]
    if several:
        lines.insert(0, f"Medians over {max(r['rounds'] for r in summary)} rounds; after the ratio to the floor, "
                        "each round's (against that round's floor).\n")
    for r in summary:
        f = floors[(r["streams"], r["stream_interval"])]
        name = "gRPC client (floor)" if r["kind"] == "floor" else f"gateway, {r['workers']} worker(s)"
        if r["kind"] == "floor":
            ratio = "1.00x"
        else:
            ratio = f"{r['vs_floor']:.2f}x"
            if several:
                ratio += " (" + " / ".join(f"{x:.2f}x" for x in r["ratios"]) + ")"
        add_ttft = r["ttft_p50_ms"] - f["ttft_p50_ms"]
        add_gap = r["gap_p99_ms"] - f["gap_p99_ms"]
        lines.append(
            f"| {r['streams']} ({r['pace_ms']:g} ms) | {r['stream_interval']} | {name} | {r['cpu_us_per_token']:.0f} us | {ratio} | "
            f"{r['relayed_per_s']:.0f} / {r['offered_per_s']:.0f} | {r['ttft_p50_ms']:.1f} ms "
            f"({add_ttft:+.1f}) | {r['gap_p50_ms']:.1f} / {r['gap_p99_ms']:.1f} ms ({add_gap:+.1f}) "
            f"| {r['machine_busy']:.0%} |")
    return "\n".join(lines)


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    summary = summarize(rows)  # medians over the rounds
    kinds = sorted({(r["kind"], r["workers"], r["stream_interval"]) for r in summary})
    for kind, workers, interval in kinds:
        sel = [r for r in summary if (r["kind"], r["workers"], r["stream_interval"]) == (kind, workers, interval)]
        label = ("gRPC floor" if kind == "floor" else f"gateway x{workers}") + f", {interval} tok/resp"
        a.plot([r["streams"] for r in sel], [r["cpu_us_per_token"] for r in sel], marker="o", label=label)
        b.plot([r["streams"] for r in sel], [r["gap_p99_ms"] for r in sel], marker="o", label=label)
    a.set(xscale="log", xlabel="open streams", ylabel="CPU us per relayed token", title="relay cost")
    a.axhline(60, color="grey", linestyle=":", label="target 60 us")
    b.set(xscale="log", yscale="log", xlabel="open streams", ylabel="inter-token gap p99 (ms)",
          title="gap at the client")
    a.legend()
    b.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",")]  # noqa: E731
    p.add_argument("--streams", type=ints, default=[1, 50, 200, 500, 1000])
    p.add_argument("--workers", type=ints, default=[1, os.cpu_count() or 2])
    p.add_argument("--seconds", type=float, default=6.0, help="how long each stream runs (sets the tokens)")
    p.add_argument("--stream-interval", type=ints, default=[1, 8],
                   help="tokens per streamed response, as the llm model's stream_interval sends them "
                        "(1: every token; N: the first at once, then N to a response); each is measured")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each relay this many times, alternating with the floor on the same Triton; "
                        "the table gives medians and each round's ratio (single runs move by 20-30 %% here)")
    p.add_argument("--out", type=Path, default=ROOT / ".cache/bench/gateway.png")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    print(f"{os.cpu_count()} CPUs ({cpu_flags()}); streams {args.streams}; workers {args.workers}; "
          f"stream_interval {args.stream_interval}; rounds {args.rounds}", flush=True)
    rows = sweep(args)
    print("\n" + table(rows))
    args.out.with_suffix(".json").parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    plot(rows, args.out)
    print(f"\nplot: {args.out}\njson: {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
