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
region that a starting Triton has just made, before its stub runs. A launcher that stops its own
Triton knows that Triton's regions exactly (those its process group's stubs name, read before it
is stopped): :func:`remove` drops them at once once it is gone, whatever their age.
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


def named_by_processes(proc: Path = Path("/proc"), *, group: int | None = None) -> set[str]:
    """The region names in the command lines of the running processes this user can read (of
    process group ``group`` only, when given: a Triton's and its stubs')."""
    names: set[str] = set()
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            if group is not None and _group_of(entry) != group:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        names.update(a.decode("utf-8", "replace") for a in args if a.startswith(PREFIX.encode()))
    return names


def _group_of(entry: Path) -> int:
    """A process's group (/proc/<pid>/stat's fifth field, after the command name, which may hold
    spaces and parentheses)."""
    return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])


def remove(names: Iterable[str], directory: Path | None = None) -> list[str]:
    """Remove these regions from ``directory`` (default SHM_DIR): a stopped Triton's,
    :func:`named_by_processes` of its group; returns those that were there. A process that still
    maps one keeps its memory until it exits."""
    directory = SHM_DIR if directory is None else directory
    removed = []
    for name in names:
        if not name.startswith(PREFIX) or "/" in name:
            continue
        try:
            (directory / name).unlink()
        except OSError:  # removed by Triton itself (a graceful stop), or never made
            continue
        removed.append(name)
    if removed:
        log.info("removed %d shared-memory region(s) of the Triton just stopped from %s", len(removed), directory)
    return removed


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
