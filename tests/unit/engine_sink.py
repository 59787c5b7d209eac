"""The engine's ``on_output`` sink for the engine's unit tests (test_engine and
test_engine_output_controls): every output per request, and thread-safe events for a request's
first output and for its end (see thread_events: the engine's thread sets them while the test's
thread waits)."""
from __future__ import annotations

from collections import defaultdict

from thread_events import Events

TIMEOUT = 120


class Collector:
    def __init__(self, on_each=None):
        self.outputs = defaultdict(list)
        self.first = Events()
        self.done = Events()
        self.on_each = on_each

    def __call__(self, out):
        self.outputs[out.request_id].append(out)
        self.first[out.request_id].set()
        if self.on_each is not None:
            self.on_each(out)
        if out.finished:
            self.done[out.request_id].set()

    def wait(self, *ids):
        for rid in ids:
            assert self.done[rid].wait(TIMEOUT), f"request {rid} did not finish"

    def tokens(self, rid):
        return [t for o in self.outputs[rid] for t in o.token_ids]

    def final(self, rid):
        finals = [o for o in self.outputs[rid] if o.finished]
        assert len(finals) == 1, f"{rid}: expected exactly one final output, got {len(finals)}"
        assert self.outputs[rid][-1].finished, f"{rid}: outputs after the final one"
        return finals[0]

    def finished(self, rid):
        """Wait for the request's end: its outputs, checked to end with exactly one final one."""
        self.wait(rid)
        self.final(rid)
        return self.outputs[rid]

    def streams(self, rid):
        """sequence index -> (tokens, finish_reason, outputs)."""
        by = defaultdict(list)
        for o in self.finished(rid):
            by[o.sequence_index or 0].append(o)
        return {i: ([t for o in outs for t in o.token_ids], outs[-1].finish_reason, outs) for i, outs in by.items()}
