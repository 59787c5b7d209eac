"""Shared-memory regions of Triton's Python backend left behind by a Triton that was killed.

Each Python-backend stub (one per model instance) talks to Triton through a region in /dev/shm,
``triton_python_backend_shm_region_<uuid>``, 1 MB at first and grown by the backend under load.
Triton removes its regions when it stops, but not when it is killed: a Triton killed because it
hung (``make serve``'s supervisor, or Kubernetes after its liveness probe, past the grace period)
leaves them. In a pod, /dev/shm is an ``emptyDir`` in memory that outlives the container and
counts against its memory, so every such restart kept a few MB more.

:func:`remove_stale` removes the regions that no running process names and that are older than
``min_age`` seconds. A stub is started with its region's name in its command line and runs as
long as its model is loaded, so a region in use is always named by one; the age keeps clear of a
region that a starting Triton has just made, before its stub runs.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("trident.triton")

PREFIX = "triton_python_backend_shm_region_"
SHM_DIR = Path("/dev/shm")
MIN_AGE = 60.0  # seconds


def named_by_processes(proc: Path = Path("/proc")) -> set[str]:
    """The region names in the command lines of the running processes this user can read."""
    names: set[str] = set()
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        names.update(a.decode("utf-8", "replace") for a in args if a.startswith(PREFIX.encode()))
    return names


def remove_stale(directory: Path = SHM_DIR, *, min_age: float = MIN_AGE, in_use: Iterable[str] | None = None
                 ) -> list[str]:
    """Remove the regions in ``directory`` that no running process names (``in_use``: those
    named; default :func:`named_by_processes`) and that are older than ``min_age`` seconds.
    Returns the names removed; regions it may not remove (another user's) are left."""
    if not directory.is_dir():
        return []
    used = set(named_by_processes() if in_use is None else in_use)
    now = time.time()
    removed, freed = [], 0
    for path in directory.glob(PREFIX + "*"):
        if path.name in used:
            continue
        try:
            st = path.stat()
            if now - st.st_mtime < min_age:
                continue
            path.unlink()
        except OSError:
            continue
        removed.append(path.name)
        freed += st.st_size
    if removed:
        log.info("removed %d shared-memory region(s) of Tritons that are gone (%.0f MB) from %s",
                 len(removed), freed / 2**20, directory)
    return removed
