"""The decode fast path's building blocks, the reduced-precision weights and the memory report."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from testkit import model_dir
import torch

from trident.engine import EngineConfig
from trident.engine import quant
from trident.engine.kv_cache import KVCache
from trident.engine.llama import apply_rope_, rms_norm, rms_norm_fp32

CKPT = model_dir()
needs_checkpoint = pytest.mark.skipif(not (CKPT / "model.safetensors").is_file(), reason=f"no checkpoint in {CKPT}")


def hf_rotate_half_rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def test_fused_rope_and_rms_norm_are_bit_identical_to_hf_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, 64, generator=g)
    cos, sin = torch.randn(5, 1, 64, generator=g), torch.randn(5, 1, 64, generator=g)
    sin_signed = torch.cat((-sin[..., :32], sin[..., 32:]), dim=-1)
    expected = hf_rotate_half_rope(x, cos, sin)
    qkv = torch.cat([x.reshape(5, -1), torch.randn(5, 7, generator=g)], dim=1)  # rope a view, in place
    view = qkv[:, :768].view(5, 12, 64)
    apply_rope_(view, cos, sin_signed)
    assert torch.equal(view, expected)
    h, w = torch.randn(7, 576, generator=g) * 3, torch.randn(576, generator=g)
    assert torch.equal(rms_norm_fp32(h, w, 1e-5), rms_norm(h, w, 1e-5))


def test_decode_index_writes_each_row_at_its_own_position():
    cache = KVCache()
    cache.setup(num_layers=2, max_batch_size=4, num_kv_heads=3, max_seq_len=8, head_dim=2, dtype=torch.float32)
    positions = torch.tensor([5, 0, 7])
    kv = torch.arange(3 * 2 * 3 * 2, dtype=torch.float32).view(3, 2, 3, 2)  # (B, k|v, head, hd)
    cache.write_decode(1, cache.decode_index(positions), kv.reshape(-1, 2))
    for b, pos in enumerate(positions.tolist()):
        assert torch.equal(cache.k[1][b, :, pos], kv[b, 0]) and torch.equal(cache.v[1][b, :, pos], kv[b, 1])
    assert cache.k[1].abs().sum() == kv[:, 0].abs().sum() and cache.k[0].abs().sum() == 0
    assert cache.nbytes() == 2 * 2 * 4 * 3 * 8 * 2 * 4


def test_packed_weights_compute_the_same_product():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(96, 64, generator=g) * 0.05, torch.randn(3, 64, generator=g)
    ref = x @ w.t()
    assert torch.allclose(quant.linear(x, quant.Fp16Weight(w)), ref, atol=2e-3)
    assert (quant.linear(x, quant.Int8Weight(w)) - ref).abs().max() < 0.05 * ref.abs().max()
    assert quant.linear(x, w) is not None and torch.equal(quant.linear(x, w), torch.nn.functional.linear(x, w))


def test_weight_dtype_config():
    assert EngineConfig(checkpoint_dir="x", dtype="auto", weight_dtype="int8").torch_dtype == torch.float32
    assert EngineConfig(checkpoint_dir="x", dtype="float32", weight_dtype="float16").torch_dtype == torch.float32
    with pytest.raises(ValueError, match="weight_dtype"):
        EngineConfig(checkpoint_dir="x", weight_dtype="int3")
    with pytest.raises(ValueError, match="float32"):
        EngineConfig(checkpoint_dir="x", dtype="bfloat16", weight_dtype="int8")


@needs_checkpoint
def test_memory_report_fills_every_slot():
    import importlib.util

    spec = importlib.util.spec_from_file_location("engine_memory", Path(__file__).resolve().parents[2]
                                                  / "scripts" / "engine_memory.py")
    engine_memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine_memory)

    report = engine_memory.resident_memory_at_max_batch(
        EngineConfig(checkpoint_dir=str(CKPT), max_batch_size=4, max_seq_len=64, dtype="float32"),
        prompt_len=8, new_tokens=3)
    assert report["peak_active"] == 4 and report["max_seq_len"] == 64
    assert report["kv_cache_bytes"] == 30 * 2 * 4 * 3 * 64 * 64 * 4
    # RSS is only compared within a fresh process (scripts/engine_memory.py): in a test process
    # that has loaded and freed other models, the allocator may reuse what it already holds.
    assert report["rss_loaded_bytes"] > 0
    assert report["rss_all_slots_active_bytes"] > 0 and report["rss_full_kv_cache_bytes"] > 0


def test_a_build_lock_left_by_a_killed_build_does_not_block_the_next(tmp_path, monkeypatch):
    """torch's own ``lock`` file outlives a killed build, and its next build would wait for it forever;
    the flock taken first is released by the kernel when its holder dies, so the next build goes on."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from trident.engine import kernels

    build_dir = tmp_path / kernels.NAME
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from trident.engine import kernels\n"
         f"with kernels._build_lock(Path({str(build_dir)!r})):\n"
         f"    Path({str(build_dir / 'lock')!r}).touch(); print('building', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "building"
    os.kill(holder.pid, signal.SIGKILL)  # killed mid-build: torch's lock file stays
    holder.wait()
    assert (build_dir / "lock").exists()

    calls = []

    def fake_load(**kwargs):  # what torch's load would meet: no leftover lock, and the flock held
        probe = subprocess.run(["flock", "-n", str(tmp_path / f"{kernels.NAME}.flock"), "true"])
        calls.append(((build_dir / "lock").exists(), probe.returncode))

    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", fake_load)
    monkeypatch.setattr(kernels, "missing_cpu_flags", lambda: [])
    kernels.load.cache_clear()
    started = time.monotonic()
    try:
        kernels.load()
    finally:
        kernels.load.cache_clear()
    assert calls == [(False, 1)]  # leftover removed; another process could not take the flock meanwhile
    assert time.monotonic() - started < 10


def test_every_build_runs_the_ninja_of_the_package_whatever_is_first_on_path(tmp_path, monkeypatch):
    """A system ninja first on PATH (Debian's 1.11 here) hashes build commands otherwise than the
    ``ninja`` package (1.13) that Triton's stubs find first: each rebuilt what the other built
    (~20 s each time `make serve` and Triton's engine stub took turns). torch's load must see the
    package's, and PATH is as it was afterwards."""
    import shutil

    import ninja

    from trident.engine import kernels

    other = tmp_path / "bin"
    other.mkdir()
    (other / "ninja").write_text("#!/bin/sh\nexit 1\n")
    (other / "ninja").chmod(0o755)
    path = os.pathsep.join([str(other), os.environ.get("PATH", "")])
    monkeypatch.setenv("PATH", path)
    assert shutil.which("ninja") == str(other / "ninja")
    seen = []
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", lambda **kwargs: seen.append(shutil.which("ninja")))
    monkeypatch.setattr(kernels, "missing_cpu_flags", lambda: [])
    kernels.load.cache_clear()
    try:
        kernels.load()
    finally:
        kernels.load.cache_clear()
    assert seen == [os.path.join(ninja.BIN_DIR, "ninja")]
    assert os.environ["PATH"] == path
