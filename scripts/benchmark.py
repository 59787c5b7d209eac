#!/usr/bin/env python3
"""Side-by-side decode benchmark: trident through Triton vs Hugging Face generate() vs llama.cpp.

One run measures every system on the same prompts and the same number of generated tokens
(end of sequence ignored everywhere), interleaved per concurrency level so that background
load on the machine hits all of them alike:

- trident-<weights>: the real Triton server (trident.triton_launcher) on free ports, serving a
  repository built by build/build_repository.py, driven on model "llm" with one streaming
  gRPC client per request (end_id -1: no end token).
- trident-<weights>+gateway: the same Triton behind the real gateway (gunicorn, one worker),
  streamed POST /generate with min_tokens = max_new_tokens (the end token banned); start the
  system without the suffix first (its Triton is shared).
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
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench.llamacpp import BENCH_VENV, CACHE, ROOT, bench_python, ensure_bench_venv, ensure_llama_server  # noqa: E402
from bench.chat import chat_table, chat_ttft  # noqa: E402
from bench.report import cpu_line, plot, summarize, table, target_lines  # noqa: E402
from bench.systems import (  # noqa: E402
    HFGenerate,
    LlamaCppPython,
    LlamaServer,
    Result,
    System,
    TridentGateway,
    TridentTriton,
    tree_rss_mb,
)

DEFAULT_SYSTEMS = "trident-int4,trident-fp32,hf,llamacpp,llamacpp-server"
TRIDENT_WEIGHTS = {"trident-fp32": "auto", "trident-fp16": "float16", "trident-int8": "int8", "trident-int4": "int4"}

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


def run_level(system: System, concurrency: int, n_requests: int, tokens: int) -> list[Result]:
    # Each request's prompt starts with its own number: no two share a KV block, so prefix reuse
    # (trident's, or llama-server's cache_prompt) plays no part in the decode figures.
    prompts = [f"{i + 1}. {PROMPTS[i % len(PROMPTS)]}" for i in range(n_requests)]
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:  # closed loop: c in flight
        return list(pool.map(lambda p: system.request(p, tokens), prompts))


def start_systems(args, names: list[str], levels: list[int], work: Path, systems: dict[str, System]) -> None:
    for name in names:
        print(f"==> starting {name}", flush=True)
        base, _, threads = name.partition("@")  # trident-int8@1: that system with 1 thread
        if base.endswith("+gateway"):
            systems[name] = TridentGateway(name, systems[base.removesuffix("+gateway")], work=work,
                                           model_dir=args.model_dir)
        elif base in TRIDENT_WEIGHTS:
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


def measure_levels(args, systems: dict[str, System], levels: list[int]) -> list[dict]:
    """Interleaved: every system at one level before the next level, and every level before the
    next round; each cell keeps its best round."""
    best: dict[tuple[str, int], dict] = {}
    for round_ in range(1, args.repeats + 1):
        for c in levels:
            for name, system in systems.items():
                if name == "hf" and c != min(levels):
                    continue  # sequential by definition: measured once per round
                n = args.hf_requests if name == "hf" else (args.requests or max(c, 3))
                print(f"==> round {round_}: {name}, concurrency {c}, {n} requests x {args.tokens} tokens", flush=True)
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
    return sorted(best.values(), key=lambda r: (r["concurrency"], list(systems).index(r["system"])))


def measure_chat(args, systems: dict[str, System], work: Path) -> list[dict]:
    """The chat scenario (bench/chat.py) on every system that reuses prefixes. llama-server gets
    its own instance: one slot with room for the history and cache_prompt on (its slots split
    one context, and a context of 32 long slots slowed its every step ~10x)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    rows = []
    for name, system in systems.items():
        if not (name.startswith("trident") or name == "llamacpp-server"):
            continue
        print(f"==> chat: {name}, follow-up after a {args.chat_history}-token history", flush=True)
        if name == "llamacpp-server":
            system = LlamaServer(work=work, threads=args.threads, slots=1, tokens=64, context=args.chat_history + 256)
            system.cache_prompt = True
        try:
            rows.append(chat_ttft(system, tokenizer=tokenizer, history_tokens=args.chat_history))
        finally:
            if system is not systems[name]:
                system.stop()
        print(f"    warm {rows[-1]['warm_ttft_ms']:.0f} ms, cold {rows[-1]['cold_ttft_ms']:.0f} ms", flush=True)
    return rows


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
    parser.add_argument("--chat-history", type=int, default=1000,
                        help="tokens of history in the chat scenario (0: skip it)")
    parser.add_argument("--model-dir", type=Path, default=CACHE / "models" / "smollm2-135m-instruct")
    parser.add_argument("--out", type=Path, default=CACHE / "bench" / "benchmark.png", help="plot (PNG)")
    parser.add_argument("--plot-only", type=Path, help=argparse.SUPPRESS)  # results JSON; bench venv
    args = parser.parse_args()
    if args.plot_only:
        plot(args.plot_only, args.out)
        return 0

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    known = {*TRIDENT_WEIGHTS, *(f"{w}+gateway" for w in TRIDENT_WEIGHTS), "hf", "llamacpp", "llamacpp-server"}
    unknown = {s.split("@")[0] for s in names} - known
    if unknown:
        parser.error(f"unknown system(s): {', '.join(sorted(unknown))}")
    for name in names:
        if name.endswith("+gateway") and name.removesuffix("+gateway") not in names[:names.index(name)]:
            parser.error(f"{name} needs {name.removesuffix('+gateway')} before it in --systems (its Triton)")
    levels = [int(c) for c in args.concurrency.split(",")]
    sys.path.insert(0, str(ROOT))
    if any(s.startswith("llamacpp") for s in names):
        ensure_bench_venv()
    if "llamacpp-server" in names:
        ensure_llama_server()

    work = Path(tempfile.mkdtemp(prefix="trident-bench-"))
    systems: dict[str, System] = {}
    chat_rows: list[dict] = []
    try:
        start_systems(args, names, levels, work, systems)
        rows = measure_levels(args, systems, levels)
        if args.chat_history:
            chat_rows = measure_chat(args, systems, work)
    finally:
        for system in systems.values():
            with contextlib.suppress(Exception):
                system.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{cpu_line()}; {args.threads} threads per system")
    print(f"{args.tokens} generated tokens per request (EOS ignored), best of {args.repeats} interleaved round(s) "
          "per cell")
    print(table(rows))
    print()
    for line in target_lines(rows):
        print(line)
    if chat_rows:
        print("\nchat: TTFT of a follow-up turn, its history cached (warm) or not (cold: same prompt, new session)")
        print(chat_table(chat_rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = args.out.with_suffix(".json")
    results.write_text(json.dumps({"cpu": cpu_line(), "tokens": args.tokens, "threads": args.threads, "rows": rows,
                                   "chat": chat_rows}, indent=1))
    print(f"\nresults: {results}")
    if bench_python().exists():
        subprocess.run([str(bench_python()), __file__, "--plot-only", str(results), "--out", str(args.out)], check=True)
        print(f"plot: {args.out} (drawn with matplotlib from {BENCH_VENV})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
