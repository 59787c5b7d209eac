"""trident.child_process: a server started from a thread that then ends keeps running (the
kernel's parent-death signal follows the forking *thread*), and dies with its launcher; a
process's group and CPU read from /proc."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from trident.child_process import ChildServer, process_cpu


class Sleeper(ChildServer):
    name = "sleeper"

    def start(self) -> "Sleeper":
        self._spawn([sys.executable, "-c", "import time; time.sleep(60)"], env={})
        return self


def test_a_server_started_from_a_short_lived_thread_outlives_it(tmp_path):
    server = Sleeper(log_path=tmp_path / "sleeper.log")
    thread = threading.Thread(target=server.start)
    thread.start()
    thread.join()
    time.sleep(1.0)  # PR_SET_PDEATHSIG's SIGTERM, had the thread forked it, arrives at once
    try:
        assert not server.exited(), f"exited with {server.process.returncode} once its starting thread ended"
    finally:
        server.stop(timeout=5)


def test_a_server_dies_with_its_launcher(tmp_path):
    """A launcher killed by SIGKILL (no cleanup at all) takes its server with it."""
    launcher = subprocess.Popen([sys.executable, "-c", f"""
import sys, threading, time
from trident.child_process import spawn
t = threading.Thread(target=lambda: print(spawn([sys.executable, '-c', 'import time; time.sleep(60)']).pid, flush=True))
t.start(); t.join(); time.sleep(60)
"""], stdout=subprocess.PIPE, text=True)
    child = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split()[2] == "Z":
                    break  # a zombie: it died (its parent, init, reaps it)
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        subprocess.run(["kill", "-9", str(child)])
        raise AssertionError("the server outlived its launcher")


def test_process_cpu_reads_the_group_and_the_cpu_of_a_live_process():
    group, before = process_cpu(os.getpid())
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    assert group == os.getpgrp()
    assert process_cpu(os.getpid())[1] - before >= 0.25
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(OSError):  # reaped: no /proc entry
        process_cpu(child.pid)
