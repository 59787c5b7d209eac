"""The step loop of the benchmarks' echo models (scripts/bench/echo_llm, scripts/bench/echo_engine).

The benchmark scripts copy this file next to each echo model's model.py: a Python-backend stub
has its model's version directory on ``sys.path``.
"""
import threading
import time
import traceback


class Pacer:
    """Calls ``step()`` on a thread of its own every ``interval`` seconds until :meth:`close`. A
    step that ends late starts the next one at once, without catching up in a burst."""

    def __init__(self, interval, step):
        self.interval = interval
        self.step = step
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="echo-pacer", daemon=True)
        self._thread.start()

    def _run(self):
        next_step = time.monotonic()
        while not self._stop.is_set():
            next_step += self.interval
            try:
                self.step()
            except Exception:  # a benchmark's pace must not stop at one bad step
                traceback.print_exc()
            delay = next_step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_step = time.monotonic()

    def close(self, timeout=5.0):
        self._stop.set()
        self._thread.join(timeout=timeout)
