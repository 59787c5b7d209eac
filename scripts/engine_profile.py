#!/usr/bin/env python3
"""Where an int4 decode step's time goes, against what the machine allows.

In one process: the memory read bandwidth (1 and 2 threads), then for each batch size a decode
step of the engine's model split into the kernel (layers + lm_head in one call), the lm_head
alone, sampling, and the engine's per-step overhead (its loop, sampling and outputs, measured as
steps/s of a running engine minus the kernel time). The batch-1 step is compared with the bytes
it must read (the int4 weights plus the Q8 embedding / lm_head table).

    .venv/bin/python scripts/engine_profile.py --batch 1,8,32 --threads 1,2
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trident.contract import SamplingParams  # noqa: E402
from trident.engine import Engine, EngineConfig, GenerationRequest  # noqa: E402
from trident.engine.sampling import RowSampling, sample  # noqa: E402


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(threads: int, mib: int = 1024) -> float:
    """GB/s of torch.sum over a buffer much larger than the caches (a streaming read)."""
    torch.set_num_threads(threads)
    x = torch.ones(mib << 18)  # mib MiB of float32
    x.sum()
    return x.numel() * 4 / best_of(x.sum, 5) / 1e9


def model_bytes(model) -> int:
    tensors = [model.wqkv, model.wo, model.w_gate_up, model.w_down, model.lm_head]
    if model.embed.data_ptr() != model.lm_head.data_ptr():
        tensors.append(model.embed)
    return sum(t.numel() * t.element_size() for t in tensors)


def kernel_step(engine: Engine, batch: int, context: int, repeats: int) -> tuple[float, float]:
    """(whole step, lm_head alone) seconds for `batch` decode rows at position `context`."""
    model, cache = engine.model, engine.cache
    for slot in range(batch):
        cache.extend(slot, context + 1)
    tokens, positions, slots = torch.full((batch,), 42), torch.full((batch,), context), torch.arange(batch)
    rows = torch.arange(batch)
    step = best_of(lambda: model.forward(tokens, positions, slots, cache, rows), repeats)
    h = torch.randn(batch, model.config.hidden_size)
    head = best_of(lambda: torch.ops.trident.q8_linear(h, model.lm_head), repeats)
    for slot in range(batch):
        cache.close(slot)
    return step, head


def sampling_time(vocab: int, batch: int, repeats: int) -> float:
    logits = torch.randn(batch, vocab)
    rows = [RowSampling(params=SamplingParams(temperature=0.0)) for _ in range(batch)]
    return best_of(lambda: sample(logits.clone(), rows), repeats)


def engine_step_time(engine: Engine, batch: int, tokens: int) -> float:
    """Seconds per step of the running engine with `batch` greedy requests decoding together."""
    done = threading.Event()
    finished = []
    marks: list[tuple[float, int]] = []

    def on_output(out):
        if out.request_id == "p0":
            marks.append((time.perf_counter(), out.step))
        if out.finished:
            finished.append(out)
            if len(finished) == batch:
                done.set()

    for i in range(batch):
        engine.submit(GenerationRequest(request_id=f"p{i}", input_ids=[1, 504, 3575, 282, 4649, 314 + i],
                                        streaming=True, sampling=SamplingParams(max_new_tokens=tokens,
                                                                                temperature=0.0)), on_output)
    done.wait(600)
    (t0, s0), (t1, s1) = marks[len(marks) // 4], marks[-2]  # steady state: every row decoding
    return (t1 - t0) / (s1 - s0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=ROOT / ".cache/models/smollm2-135m-instruct")
    parser.add_argument("--batch", default="1,8,32")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--context", type=int, default=100, help="position of the decoded token")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    flags = open("/proc/cpuinfo").read().split("\nflags")[1].split("\n")[0].split()
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx512_bf16") if f in flags]
    print(f"CPU flags: {' '.join(isa)}")
    thread_counts = [int(t) for t in args.threads.split(",")]
    for t in thread_counts:
        print(f"memory read bandwidth, {t} thread(s): {read_bandwidth(t):.1f} GB/s")
    batches = [int(b) for b in args.batch.split(",")]
    engine = Engine(EngineConfig(checkpoint_dir=str(args.model_dir), max_batch_size=max(batches), max_seq_len=2048,
                                 dtype="float32", weight_dtype="int4"))
    isa_name = "AVX-512 VNNI" if torch.ops.trident.set_kernel_isa(-1) == 1 else "AVX2"
    nbytes = model_bytes(engine.model)
    print(f"int4 kernels on the {isa_name} path; a batch-1 step reads {nbytes / 1e6:.1f} MB of weights")
    vocab = engine.model.config.vocab_size
    with torch.inference_mode():
        for t in thread_counts:
            torch.set_num_threads(t)
            for b in batches:
                step, head = kernel_step(engine, b, args.context, args.repeats)
                samp = sampling_time(vocab, b, args.repeats)
                line = (f"threads {t} batch {b:3d}: kernel step {step * 1e3:6.2f} ms (lm_head {head * 1e3:5.2f} ms, "
                        f"layers {(step - head) * 1e3:6.2f} ms), sampling {samp * 1e3:5.2f} ms; "
                        f"{b / step:7.1f} tok/s kernel-only")
                if b == 1:
                    line += f"; {nbytes / step / 1e9:.1f} GB/s of weights"
                print(line, flush=True)
    engine = None
    # the running engine: kernel + sampling + loop + outputs (no Triton), every step on t threads
    for t in thread_counts:
        engine = Engine(EngineConfig(checkpoint_dir=str(args.model_dir), max_batch_size=max(batches), max_seq_len=2048,
                                     dtype="float32", weight_dtype="int4", num_threads=t, small_batch_size=0))
        engine.start()
        try:
            for b in batches:
                per_step = engine_step_time(engine, b, 64)
                print(f"engine, {t} thread(s), batch {b:3d}: {per_step * 1e3:6.2f} ms a step, {b / per_step:7.1f} tok/s",
                      flush=True)
        finally:
            engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
