"""The benchmark's numbers: per-level summaries, the table, the target ratios, the plot."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .systems import Result

# Targets on aggregate decode tok/s (issue 16; "llama.cpp" is the stronger of its two servers).
TARGETS = (("c=1 vs llama.cpp", 1, "llamacpp", 1.0), ("c=8 vs llama.cpp", 8, "llamacpp", 1.2),
           ("c=32 vs llama.cpp", 32, "llamacpp", 2.0), ("c=32 vs HF sequential", 32, "hf", 10.0))


def cpu_line() -> str:
    """The CPU's model and the instruction sets the kernels care about, from /proc/cpuinfo."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return "CPU unknown"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8")
    return f"{model}, {os.cpu_count()} CPUs, flags {' '.join(f for f in wanted if f in flags)}"


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result]) -> dict:
    intervals = sorted((r.t_first, r.t_end) for r in results)
    busy, cur_start, cur_end = 0.0, None, None
    for a, b in intervals:  # length of the union of the decode intervals
        if cur_end is None or a > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = a, b
        else:
            cur_end = max(cur_end, b)
    busy += (cur_end - cur_start) if cur_end is not None else 0.0
    ttft = [r.t_first - r.t_start for r in results]
    wall = max(r.t_end for r in results) - min(r.t_start for r in results)
    total = sum(r.tokens for r in results)
    return {
        "requests": len(results),
        "tokens": total,
        "tokens_per_request": sorted({r.tokens for r in results}),
        "decode_tok_s": sum(r.tokens - 1 for r in results) / busy if busy > 0 else float("nan"),
        "e2e_tok_s": total / wall,
        "ttft_p50_ms": percentile(ttft, 50) * 1000,
        "ttft_p99_ms": percentile(ttft, 99) * 1000,
    }


def table(rows: list[dict]) -> str:
    head = f"{'system':<16} {'conc':>4} {'reqs':>4} {'tok/req':>8} {'decode tok/s':>12} {'e2e tok/s':>10} " \
           f"{'TTFT p50 ms':>11} {'TTFT p99 ms':>11} {'RSS MB':>7}  decode tok/s per round"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['system']:<16} {r['concurrency']:>4} {r['requests']:>4} "
                     f"{'/'.join(map(str, r['tokens_per_request'])):>8} {r['decode_tok_s']:>12.1f} "
                     f"{r['e2e_tok_s']:>10.1f} {r['ttft_p50_ms']:>11.0f} {r['ttft_p99_ms']:>11.0f} "
                     f"{r.get('rss_mb', float('nan')):>7.0f}  {r.get('rounds', '')}")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> list[str]:
    def rate(system, c):
        if system == "hf":  # sequential baseline: its rate does not depend on the client count
            c = min((r["concurrency"] for r in rows if r["system"] == "hf"), default=None)
        if system == "llamacpp":  # the stronger of the two llama.cpp servers
            found = [r["decode_tok_s"] for r in rows if r["system"] in ("llamacpp", "llamacpp-server")
                     and r["concurrency"] == c]
            return max(found) if found else None
        found = [r["decode_tok_s"] for r in rows if r["system"] == system and r["concurrency"] == c]
        return found[0] if found else None

    out = []
    for sysname in sorted({r["system"] for r in rows if r["system"].startswith("trident")}):
        for label, c, base, goal in TARGETS:
            ours, theirs = rate(sysname, c), rate(base, c)
            if ours is None or theirs is None:
                continue
            ratio = ours / theirs
            out.append(f"{sysname:<14} {label:<22} {ours:8.1f} / {theirs:8.1f} = {ratio:5.2f}x "
                       f"(target >= {goal}x): {'MET' if ratio >= goal else 'NOT MET'}")
    # issue 16: through the gateway within 10 % of direct gRPC, at every measured level
    for sysname in sorted({r["system"] for r in rows if r["system"].endswith("+gateway")}):
        direct = sysname.removesuffix("+gateway")
        for c in sorted({r["concurrency"] for r in rows if r["system"] == sysname}):
            ours, theirs = rate(sysname, c), rate(direct, c)
            if ours is None or theirs is None:
                continue
            ratio = ours / theirs
            out.append(f"{sysname:<14} c={c:<20} {ours:8.1f} / {theirs:8.1f} = {ratio:5.2f}x of direct gRPC "
                       f"(target >= 0.9x): {'MET' if ratio >= 0.9 else 'NOT MET'}")
    return out


def plot(results_json: Path, out: Path) -> None:
    """Runs under the bench venv (matplotlib): decode tok/s and TTFT p50 per system and level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = json.loads(results_json.read_text())["rows"]
    systems = list(dict.fromkeys(r["system"] for r in rows))
    levels = sorted({r["concurrency"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(systems), 1)
    for i, system in enumerate(systems):
        for ax, key in zip(axes, ("decode_tok_s", "ttft_p50_ms")):
            xs, ys = [], []
            for j, c in enumerate(levels):
                found = [r[key] for r in rows if r["system"] == system and r["concurrency"] == c]
                if found:
                    xs.append(j + i * width)
                    ys.append(found[0])
            ax.bar(xs, ys, width, label=system)
    for ax, title in zip(axes, ("aggregate decode tokens/s (higher is better)", "TTFT p50, ms (lower is better)")):
        ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(levels))])
        ax.set_xticklabels([f"concurrency {c}" for c in levels])
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
