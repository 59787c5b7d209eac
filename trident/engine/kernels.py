"""trident's own CPU kernels (csrc/): built once with torch's C++ extension
machinery, cached under torch's extensions directory (TORCH_EXTENSIONS_DIR), loaded as torch ops.

torch guards a build with a ``lock`` file that a killed build leaves behind, and every later
build then waits for it forever, silently. ``load`` takes an OS lock (flock, released when its
holder dies) first: whoever holds it is the only builder (every build goes through ``load``), so
a ``lock`` file it finds is such a leftover and is removed.

    python -c 'from trident.engine import kernels; kernels.main()'   # build now (make kernels)
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import sys
from pathlib import Path

import torch

from trident.fsutil import environ_set

log = logging.getLogger("trident.engine")

CSRC = Path(__file__).with_name("csrc")
SOURCES = [CSRC / name for name in ("gemm.cpp", "layers.cpp", "forward.cpp", "ops.cpp")]
NAME = "trident_kernels"
REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c")
CFLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"]


class KernelsUnavailable(RuntimeError):
    pass


def missing_cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return list(REQUIRED_CPU_FLAGS)
    return [flag for flag in REQUIRED_CPU_FLAGS if flag not in flags]


@functools.lru_cache(maxsize=None)
def load() -> None:
    """Build (first time, ~20 s) and load the kernels; raises KernelsUnavailable with the reason."""
    missing = missing_cpu_flags()
    if missing:
        raise KernelsUnavailable(f"the int4 kernels need a CPU with {', '.join(missing)}")
    from torch.utils import cpp_extension

    try:
        with _build_lock(build_directory()), package_ninja():
            cpp_extension.load(name=NAME, sources=[str(s) for s in SOURCES], extra_cflags=CFLAGS,
                               extra_ldflags=["-fopenmp"], extra_include_paths=[str(CSRC)],
                               is_python_module=False, verbose=False)
    except (RuntimeError, OSError, ImportError) as exc:  # no compiler, no ninja, build error
        raise KernelsUnavailable(f"building {NAME} from {CSRC} failed: {exc}") from exc
    log.info("loaded %s", NAME)


def build_directory() -> Path:
    """Where torch builds and caches the kernels (it honours TORCH_EXTENSIONS_DIR)."""
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(NAME, verbose=False))


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Hold an flock beside ``build_dir`` (waiting for a build in another process); remove torch's
    ``lock`` file in it if one is there, which only a killed build can have left."""
    build_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(build_dir.with_name(build_dir.name + ".flock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        leftover = build_dir / "lock"
        if leftover.exists():
            log.warning("removing %s, left by a build of %s that was killed", leftover, NAME)
            leftover.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the flock


@contextlib.contextmanager
def package_ninja():
    """Put the ``ninja`` package's binary (a dependency of trident) first on PATH for a build.

    torch runs the first ``ninja`` on PATH. The venv's comes first only where the venv is on PATH,
    as in Triton's stubs (trident.triton_launcher); a plain ``.venv/bin/python`` (``make
    kernels``, pytest) found the system's ninja instead, where there is one. Ninja 1.11 (Debian's)
    and 1.13 (the package) hash build commands differently, so each took the other's build for
    stale and built the kernels again: about 20 s of wall time and 32 s of CPU (2-vCPU EPYC) at
    every switch, in `make serve`'s kernel step and then in Triton's engine stub, at every start.
    Without the package (an install that has no pip ``ninja``) PATH is left as it is."""
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        yield
        return
    with environ_set("PATH", os.pathsep.join(p for p in (bin_dir, os.environ.get("PATH")) if p)):
        yield


def ops():
    load()
    return torch.ops.trident


def main() -> int:
    """Build and load now; not ``python -m``: trident.engine imports this module already."""
    logging.basicConfig(level=logging.INFO)
    try:
        load()
    except KernelsUnavailable as exc:
        print(f"trident kernels unavailable: {exc}", file=sys.stderr)
        return 1
    print(f"trident kernels ready in {build_directory()}")
    return 0
