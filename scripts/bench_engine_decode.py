#!/usr/bin/env python3
"""Decode tokens/s of 32 streams (``--batch``) of the CPU engine alone (int4, no Triton), for the
code in ROOT.

    .venv/bin/python scripts/bench_engine_decode.py                    # this checkout, greedy and sampled
    git worktree add /tmp/before <commit>
    .venv/bin/python scripts/bench_engine_decode.py --root /tmp/before --label before --modes sampled
    .venv/bin/python scripts/bench_engine_decode.py --checkpoint /tmp/synth --batch 1 --modes greedy

Submits ``--batch`` streaming requests of a 6-token prompt (each its own), 96 new tokens each, all
decoding together, and reports the steady-state rate (tokens of every stream between a quarter
of the way in and the end, over that time), best of 3 runs per mode. Modes: greedy, sampled
(T 0.8, top-p 0.95, seeded), logprobs5 (sampled with 5 alternatives a token). Used for the
before/after tables in docs/cpu_engine.md; run the two alternately, the machine is noisy.
"""
import argparse
import sys
import threading
import time
from pathlib import Path

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="checkout whose engine to time")
p.add_argument("--label", default="this")
p.add_argument("--modes", default="greedy,sampled")
p.add_argument("--checkpoint", default=str(Path(__file__).resolve().parents[1] / ".cache/models/smollm2-135m-instruct"))
p.add_argument("--batch", type=int, default=32, help="streams decoding together (the engine's slots)")
args = p.parse_args()
sys.path.insert(0, args.root)

import trident.engine as te  # noqa: E402
from trident.contract import SamplingParams  # noqa: E402
from trident.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402

assert te.__file__.startswith(args.root), te.__file__
B, TOKENS = args.batch, 96
engine = Engine(EngineConfig(checkpoint_dir=args.checkpoint, max_batch_size=B, max_seq_len=512, dtype="float32",
                             weight_dtype="int4", num_threads=2))
engine.start()


def run(mode: str, tag: str) -> float:
    done, finished, marks = threading.Event(), [], []

    def on_output(out):
        if out.request_id == f"{tag}0":
            marks.append((time.perf_counter(), out.step))
        if out.finished:
            finished.append(out)
            if len(finished) == B:
                done.set()

    for i in range(B):
        kw = dict(max_new_tokens=TOKENS, temperature=0.0)
        if mode != "greedy":
            kw.update(temperature=0.8, top_p=0.95, seed=i)
        if mode == "logprobs5":
            kw.update(logprobs=5)
        engine.submit(GenerationRequest(request_id=f"{tag}{i}", input_ids=[1, 504, 3575, 282, 4649, 314 + i],
                                        streaming=True, sampling=SamplingParams(**kw)), on_output)
    assert done.wait(600)
    (t0, s0), (t1, s1) = marks[len(marks) // 4], marks[-2]
    return B * (s1 - s0) / (t1 - t0)


run("greedy", "warm")
for mode in args.modes.split(","):
    rates = [run(mode, f"{mode}{k}-") for k in range(3)]
    print(f"{args.label} {mode}: {max(rates):.1f} tok/s (runs: {', '.join(f'{r:.1f}' for r in rates)})", flush=True)
engine.stop()
