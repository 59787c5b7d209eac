"""Echo engine with the engine interface (the ``tensorrt_llm`` model's tensors), for measuring the
``llm`` model at GPU-like rates: a pace, not a model.

A stand-in for TensorRT-LLM's in-flight batcher with none of its compute: ``slots`` requests
decode at once, the others wait in arrival order for a slot. One ticker thread: every
``interval_ms``, each request in a slot gets one token (the ids of its own prompt, in turn, so
that ``llm`` detokenizes real text), then, at ``request_output_len``, its last token with the
final flag. A ``stop`` request (TensorRT-LLM's, by request id) ends the request it names, queued
or decoding; a cancelled request leaves at its next check (every 25 ticks, an IPC round trip),
and one still waiting at admission never gets a slot.
"""
import collections
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
from pacing import Pacer  # scripts/bench/pacing.py, copied next to this file

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
CANCEL_CHECK_TICKS = 25


class _Request:
    __slots__ = ("sender", "request_id", "ids", "left", "made", "stopped")

    def __init__(self, sender, request_id, ids, left):
        self.sender, self.request_id, self.ids, self.left = sender, request_id, ids, left
        self.made = 0
        self.stopped = False


def _token(token_id, made):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.array([[[token_id]]], dtype=np.int32)),
        pb_utils.Tensor("sequence_length", np.array([[made]], dtype=np.int32)),
    ])


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.interval = float(params["interval_ms"]) / 1000
        self.slots = int(params["max_batch_size"])
        self.lock = threading.Lock()
        self.waiting = collections.deque()
        self.active = []
        self.pacer = Pacer(self.interval, self._step)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            stop = _input(request, "stop")
            if stop is not None and stop.size and bool(stop[0]):
                with self.lock:
                    for entry in (*self.waiting, *self.active):
                        if entry.request_id == request.request_id():
                            entry.stopped = True
                sender.send(flags=FINAL)
                continue
            ids = _input(request, "input_ids").tolist() or [0]
            left = max(int(_input(request, "request_output_len")[0]), 1)
            with self.lock:
                self.waiting.append(_Request(sender, request.request_id(), ids, left))
        return None

    def _admit(self):
        """Moves waiting requests into free slots (those whose client left are ended instead)."""
        with self.lock:
            while self.waiting and len(self.active) < self.slots:
                entry = self.waiting.popleft()
                try:
                    if entry.stopped or entry.sender.is_cancelled():
                        entry.sender.send(flags=FINAL)
                        continue
                except Exception:  # the client is gone
                    continue
                self.active.append(entry)
            return list(self.active)

    def _step(self):
        """One engine step: a token for every request in a slot."""
        done = []
        for entry in self._admit():
            try:
                if entry.stopped or (entry.made % CANCEL_CHECK_TICKS == 0 and entry.made
                                     and entry.sender.is_cancelled()):
                    done.append(entry)
                    entry.sender.send(flags=FINAL)
                    continue
                token_id = entry.ids[entry.made % len(entry.ids)]
                entry.made += 1
                entry.left -= 1
                if entry.left == 0:
                    done.append(entry)
                    entry.sender.send(_token(token_id, entry.made), flags=FINAL)
                else:
                    entry.sender.send(_token(token_id, entry.made))
            except Exception:  # the client is gone
                done.append(entry)
        if done:
            with self.lock:
                self.active = [e for e in self.active if e not in done]

    def finalize(self):
        self.pacer.close()
