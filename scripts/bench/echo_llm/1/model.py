"""Echo model with the llm interface, for the gateway benchmark: a pace, not a model.

One ticker thread: every interval, each open stream gets one token " tok" (its index in the
text, so a client can check order), then, at max_tokens, a final response with finish_reason
"length" and the counts. Cancelled streams are dropped at the next tick. With the parameter
``stream_interval`` N, tokens are sent as the llm model sends them: the first at once, then N to
a response (trident.llm_service).
"""
import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils
from pacing import Pacer  # scripts/bench/pacing.py, copied next to this file

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _text(text, final_count=None):
    outputs = [pb_utils.Tensor("text_output", np.array([[text.encode()]], dtype=np.object_))]
    if final_count is not None:
        outputs += [
            pb_utils.Tensor("finish_reason", np.array([[b"length"]], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([[1]], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[final_count]], dtype=np.int32)),
        ]
    return pb_utils.InferenceResponse(output_tensors=outputs)


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.interval = float(params["interval_ms"]) / 1000
        self.stream_interval = int(params.get("stream_interval", "1"))
        self.lock = threading.Lock()
        self.streams = []  # [sender, tokens left, tokens made, stream?, text not sent yet]
        self.pacer = Pacer(self.interval, self._step)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(pb_utils.get_input_tensor_by_name(request, "max_tokens").as_numpy().reshape(-1)[0])
            stream = pb_utils.get_input_tensor_by_name(request, "stream")
            stream = bool(stream.as_numpy().reshape(-1)[0]) if stream is not None else False
            if json.loads(request.parameters() or "{}").get("trident_admission_ack"):
                sender.send(pb_utils.InferenceResponse(output_tensors=[]))
            with self.lock:
                self.streams.append([sender, max(n, 1), 0, stream, []])
        return None

    def _step(self):
        """One tick: a token for every open stream."""
        with self.lock:
            streams = list(self.streams)
        done = []
        for entry in streams:
            sender, left, sent, stream, parts = entry
            try:
                if sent % 25 == 0 and sender.is_cancelled():  # an IPC round trip: not every token
                    done.append(entry)
                    sender.send(flags=FINAL)
                    continue
                parts.append(f" {sent}")
                entry[1], entry[2] = left - 1, sent + 1
                if entry[1] == 0:
                    done.append(entry)
                    sender.send(_text("".join(parts), final_count=entry[2]), flags=FINAL)
                elif stream and (sent == 0 or len(parts) >= self.stream_interval):
                    sender.send(_text("".join(parts)))
                    parts.clear()
            except Exception:
                done.append(entry)
        if done:
            gone = {id(entry) for entry in done}
            with self.lock:
                self.streams = [s for s in self.streams if id(s) not in gone]

    def finalize(self):
        self.pacer.close()
