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


def test_a_process_groups_regions_are_read_and_removed_whatever_their_age(tmp_path):
    """What TritonServer.stop does: the names the group's processes hold, read while they run,
    removed once they are gone (a killed Triton's, made a moment ago); others are left."""
    name = shm_regions.PREFIX + "a1b2c3d4"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", name], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while name not in shm_regions.named_by_processes(group=proc.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shm_regions.named_by_processes(group=proc.pid) == {name}
        assert name not in shm_regions.named_by_processes(group=os.getpgrp())
    finally:
        proc.kill()
        proc.wait()
    region = _region(tmp_path, "a1b2c3d4", age_from=time.time())
    other = _region(tmp_path, "other", age_from=OLD)
    assert shm_regions.remove({name, "not_a_region", shm_regions.PREFIX + "never-made"}, tmp_path) == [name]
    assert not region.exists() and other.exists()


def test_triton_server_stop_removes_its_stubs_regions_read_at_start_and_at_stop(tmp_path, monkeypatch):
    """TritonServer.stop: the regions its group's processes named once it was ready (a stub that
    has died since) and at the stop (one still running) both go; another Triton's stay."""
    from trident.child_process import spawn
    from trident.triton_launcher import TritonServer

    monkeypatch.setattr(shm_regions, "SHM_DIR", tmp_path)
    running, died, other = (_region(tmp_path, name, age_from=time.time()) for name in ("run", "died", "other"))
    server = TritonServer(model_repository=tmp_path, work_dir=tmp_path)
    server.process = spawn([sys.executable, "-c", "import time; time.sleep(60)", running.name])
    deadline = time.monotonic() + 10
    while running.name not in shm_regions.named_by_processes(group=server.process.pid):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server._regions = {died.name}
    server.stop(timeout=10)
    assert not running.exists() and not died.exists() and other.exists()


def test_no_directory_is_nothing_to_do(tmp_path):
    assert shm_regions.remove_stale(tmp_path / "absent") == []
