"""A server run as a child process: its own session, its log in a file, an orderly stop."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at this moment (the OS picks it), for a server about to start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_cpu(pid: int) -> tuple[int, float]:
    """A live process's group and its user + system CPU seconds so far (/proc/<pid>/stat; the
    fields after the command name, which may hold spaces and parentheses). OSError once it ended."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[2]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the launching process dies, even by SIGKILL.

    The child runs in its own session (so a terminal's Ctrl-C reaches only the launcher, which
    stops its children in order), and without this an interrupted launcher would leave it
    running.
    """
    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


#: Children are started from this one thread, which lives as long as the process. The kernel
#: sends PR_SET_PDEATHSIG's signal when the *thread* that forked the child exits, not the
#: process: a server started from a short-lived thread (scripts/serve.py starts its Tritons in
#: parallel, and restarts them from a supervisor thread) got SIGTERM as soon as that thread ended.
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trident-spawn")


def spawn(cmd: Sequence[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen(cmd, **kwargs)`` in its own session, sent SIGTERM when this process
    dies (die_with_parent), from the long-lived spawner thread."""
    return _SPAWNER.submit(subprocess.Popen, list(cmd), start_new_session=True, preexec_fn=die_with_parent,
                           **kwargs).result()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class ChildServer:
    """Base of the Triton and gateway launchers; subclasses say how to start and when ready."""

    name = "server"
    stop_signal = signal.SIGTERM

    def __init__(self, *, log_path: Path):
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self._log_file = None

    def _spawn(self, cmd: Sequence[str], *, env: dict, echo: bool = False) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = None
        if not echo:
            self._log_file = open(self.log_path, "ab")
            out = self._log_file
        self.process = spawn(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no {self.name} log)"
        return f"---- last lines of the {self.name} log ----\n" + "\n".join(text[-lines:])

    def stop(self, *, timeout: float = 30.0) -> None:
        """Ask the server to stop (``stop_signal``); kill its process group after ``timeout``."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0fs, killing it", self.name, timeout)
        if proc is not None:
            # Whatever is left of its process group (e.g. Triton's backend stubs after Triton
            # itself died) goes too: orphans would keep a whole model in memory.
            kill_group(proc.pid)
            proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
