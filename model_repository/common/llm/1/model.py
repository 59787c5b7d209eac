"""Triton adapter of the text-level ``llm`` model; the logic is in trident.generation.

``execute`` never blocks: each request is handed to a worker thread that streams tokens from
the engine model over BLS and sends text responses through the request's response sender.
"""
import itertools
import json
import logging
import queue
import random
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from trident.errors import InvalidRequest, TaggedError
from trident.generation import TextGeneration, engine_tensors, parse_text_request

log = logging.getLogger("trident.llm")
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        from transformers import AutoTokenizer

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.engine_model = params.get("engine_model", "tensorrt_llm")
        self.max_context = int(params.get("max_context", "2048"))
        self.max_new_tokens_limit = int(params.get("max_new_tokens_limit", "2048"))
        workers = int(params.get("max_concurrent_requests", "256"))
        self.tokenizer = AutoTokenizer.from_pretrained(params["tokenizer_dir"])
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id
        # Daemon workers: a worker still waiting on the engine must not hold the stub
        # process open at unload (ThreadPoolExecutor joins its threads at exit).
        self._work = queue.SimpleQueue()
        self._workers = workers
        for i in range(workers):
            threading.Thread(target=self._worker, name=f"llm-{i}", daemon=True).start()
        # Engine request ids are decimal strings: TensorRT-LLM's backend matches a "stop"
        # request to the running one by this id.
        self._ids = itertools.count(random.randrange(1, 2**31) << 20)
        self._ids_lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            self._work.put(request)
        return None

    def finalize(self):
        for _ in range(self._workers):  # one stop marker per worker
            self._work.put(None)

    def _worker(self):
        while (request := self._work.get()) is not None:
            self._serve(request)

    # -- one request, in a worker thread --------------------------------------------------

    def _serve(self, request):
        sender = request.get_response_sender()
        try:
            self._generate(request, sender)
        except TaggedError as exc:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(exc.tagged())), flags=FINAL)
        except EngineFailure as exc:  # already tagged by the engine model (e.g. queue full)
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))), flags=FINAL)
        except Exception as exc:  # never escape: answer the request, keep the model alive
            log.exception("llm request failed")
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"internal error: {exc}")),
                        flags=FINAL)

    def _generate(self, request, sender):
        req = parse_text_request(lambda name: _input(request, name))
        if req.max_tokens > self.max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens must be between 1 and {self.max_new_tokens_limit}, got {req.max_tokens}",
                param="max_new_tokens")
        input_ids = self.tokenizer(req.prompt).input_ids
        if len(input_ids) + req.max_tokens > self.max_context:
            raise InvalidRequest(
                f"the prompt has {len(input_ids)} tokens and max_new_tokens is {req.max_tokens}: "
                f"together {len(input_ids) + req.max_tokens}, over the model's context of "
                f"{self.max_context} tokens", param="prompt")
        bad_ids = [self.tokenizer(w, add_special_tokens=False).input_ids for w in req.bad_words]
        tensors = engine_tensors(req, input_ids=input_ids, end_id=self.end_id, pad_id=self.pad_id,
                                 bad_words_ids=[b for b in bad_ids if b])
        gen = TextGeneration(self.tokenizer, req, prompt_tokens=len(input_ids))
        with self._ids_lock:
            engine_id = str(next(self._ids))
        text_parts = []
        stopping = False
        for response in self._engine_stream(tensors, engine_id):
            if response.has_error():
                raise EngineFailure(response.error().message())
            if stopping:
                continue  # drain the engine stream up to its final response
            delta = gen.push(_output_ids(response))
            cancelled = sender.is_cancelled()
            if gen.stopped or cancelled:
                stopping = True
                self._stop_engine(engine_id)
            if cancelled:
                log.info("request %s cancelled by the client after %d tokens", engine_id,
                         gen.completion_tokens)
            elif delta and req.stream:
                sender.send(_text_response(delta))
            elif delta:
                text_parts.append(delta)
        if sender.is_cancelled():
            # Close the response stream; Triton may refuse a send on a cancelled request.
            try:
                sender.send(flags=FINAL)
            except Exception:
                pass
            return
        tail = gen.finish()
        text = tail if req.stream else "".join(text_parts) + tail
        sender.send(_text_response(text, gen), flags=FINAL)

    def _engine_stream(self, tensors, engine_id):
        infer = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[pb_utils.Tensor(name, value) for name, value in tensors.items()],
            requested_output_names=["output_ids", "sequence_length"],
            request_id=engine_id,
        )
        # Iterating drains the stream to its final response, also after a stop.
        yield from infer.exec(decoupled=True)

    def _stop_engine(self, engine_id):
        stop = pb_utils.InferenceRequest(
            model_name=self.engine_model,
            inputs=[
                pb_utils.Tensor("input_ids", np.zeros((1, 1), dtype=np.int32)),
                pb_utils.Tensor("input_lengths", np.ones((1, 1), dtype=np.int32)),
                pb_utils.Tensor("request_output_len", np.ones((1, 1), dtype=np.int32)),
                pb_utils.Tensor("stop", np.ones((1, 1), dtype=np.bool_)),
            ],
            requested_output_names=["output_ids"],
            request_id=engine_id,
        )
        for _ in stop.exec(decoupled=True):
            pass


class EngineFailure(Exception):
    """The engine model answered with an error; its message is passed on unchanged."""


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _output_ids(response):
    out = pb_utils.get_output_tensor_by_name(response, "output_ids")
    return [] if out is None else out.as_numpy().reshape(-1).tolist()


def _text_response(text, gen=None):
    outputs = [pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
    if gen is not None:
        outputs += [
            pb_utils.Tensor("finish_reason", np.array([[gen.finish_reason.encode()]], dtype=np.object_)),
            pb_utils.Tensor("prompt_tokens", np.array([[gen.prompt_tokens]], dtype=np.int32)),
            pb_utils.Tensor("completion_tokens", np.array([[gen.completion_tokens]], dtype=np.int32)),
        ]
    return pb_utils.InferenceResponse(output_tensors=outputs)
