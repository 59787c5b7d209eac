"""trident.shm_regions: the Python backend's regions of a Triton that was killed are removed, those
in use or just made are kept."""
from __future__ import annotations

import os
import subprocess
import sys
import time

from trident import shm_regions

OLD = time.time() - 3600


def _region(directory, name, *, age_from=OLD):
    path = directory / (shm_regions.PREFIX + name)
    path.write_bytes(b"\0" * 1024)
    os.utime(path, (age_from, age_from))
    return path


def test_only_old_regions_that_no_process_names_are_removed(tmp_path):
    gone = _region(tmp_path, "gone")
    used = _region(tmp_path, "used")
    fresh = _region(tmp_path, "fresh", age_from=time.time())  # a starting Triton's, its stub not yet up
    other = tmp_path / "something_else"
    other.write_bytes(b"x")
    os.utime(other, (OLD, OLD))
    removed = shm_regions.remove_stale(tmp_path, in_use={used.name})
    assert removed == [gone.name]
    assert not gone.exists() and used.exists() and fresh.exists() and other.exists()


def test_a_region_named_on_a_running_command_line_is_in_use(tmp_path):
    """A stub gets its region's name as an argument; a stopped (SIGSTOP) or busy one still has it."""
    name = shm_regions.PREFIX + "0f1e2d3c"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", name])
    try:
        deadline = time.monotonic() + 10
        while name not in shm_regions.named_by_processes() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert name in shm_regions.named_by_processes()
        region = _region(tmp_path, "0f1e2d3c")
        assert shm_regions.remove_stale(tmp_path) == [] and region.exists()
    finally:
        proc.kill()
        proc.wait()
    assert shm_regions.remove_stale(tmp_path) == [region.name] and not region.exists()


def test_no_directory_is_nothing_to_do(tmp_path):
    assert shm_regions.remove_stale(tmp_path / "absent") == []
