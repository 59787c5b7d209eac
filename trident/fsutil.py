"""File-system helpers shared by the build steps and the scripts, and one for this process's
environment (:func:`environ_set`)."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def environ_set(name: str, value: str) -> Iterator[None]:
    """``os.environ[name] = value`` for the block, then as it was (unset if it was unset)."""
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


@contextlib.contextmanager
def replace_dir(out_dir: Path) -> Iterator[Path]:
    """Yield an empty folder beside ``out_dir`` that replaces it when the block succeeds.

    A reader never sees a half-written ``out_dir``, and a failed build leaves the old one.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A new temporary folder for a run's servers and logs: removed when the block succeeds, kept
    (and named on stderr) when it fails, for its logs."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    except BaseException:
        print(f"logs kept in {path}", file=sys.stderr, flush=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
